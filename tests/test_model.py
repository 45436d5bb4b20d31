"""Tests of diffhand_jax/models/diffhand.py: build_model, init_params and the model methods."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax import diffusion
from diffhand_jax import mano
from diffhand_jax import procedural_mano
from diffhand_jax.models import build_model
from diffhand_jax.models import diffhand
from diffhand_jax.models import init_params
from helpers import SMOKE_IMAGE_SIZE
from helpers import smoke_config
from helpers import smoke_images
from helpers import smoke_params

IMAGE_SIZE = SMOKE_IMAGE_SIZE  # the smoke ResNet (stride 16): 4 tokens


@pytest.mark.parametrize('decoder', ['cross_modality', 'vanilla'])
def test_variants_shapes_and_methods(decoder):
  """Both decoders, diffusion on and off, in one compiled function per decoder."""
  model, regressor_model = build_model(smoke_config(decoder)), build_model(
      smoke_config(decoder, False)
  )
  params = smoke_params(decoder)
  images = smoke_images()
  x_t = jax.random.normal(jax.random.key(1), (2, 778, 3))
  t = jnp.array([5, 900])

  @jax.jit
  def run(p):
    variables = {'params': p}
    tokens, embedding = model.apply(variables, images, method='encode')
    return {
        'diffusion': model.apply(variables, images, x_t, t),
        'regressor': regressor_model.apply(variables, images, x_t, t),
        'regressor_other_input': regressor_model.apply(variables, images, x_t + 1.0, t + 7),
        'tokens': tokens,
        'embedding': embedding,
        'camera': model.apply(variables, embedding, method='camera'),
        'denoise': model.apply(variables, x_t, t, tokens, embedding, method='denoise'),
        'denoise_zero': model.apply(
            variables, jnp.zeros_like(x_t), jnp.zeros_like(t), tokens, embedding, method='denoise'
        ),
    }

  out = run(params)
  for name in ('diffusion', 'regressor'):
    assert out[name]['x0'].shape == (2, 778, 3) and out[name]['x0'].dtype == jnp.float32
    assert out[name]['camera'].shape == (2, 3)
    np.testing.assert_allclose(out[name]['camera'], out['camera'], rtol=1e-5, atol=1e-6)
  assert out['tokens'].shape == (2, 4, 64) and out['embedding'].shape == (2, 64)
  # __call__ = encode + denoise (+ camera); the regressor denoises x_t = 0 at t = 0 and so
  # ignores x_t and t.
  np.testing.assert_allclose(out['diffusion']['x0'], out['denoise'], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out['regressor']['x0'], out['denoise_zero'], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      out['regressor_other_input']['x0'], out['regressor']['x0'], rtol=1e-4, atol=1e-5
  )
  assert not np.allclose(out['diffusion']['x0'], out['regressor']['x0'], atol=1e-3)


def test_build_model_is_hashable_static_and_uses_the_hand_model():
  config = smoke_config()
  model_a, model_b = build_model(config), build_model(config)
  assert model_a == model_b and hash(model_a) == hash(model_b)
  assert model_a != build_model(smoke_config('vanilla'))
  hand = procedural_mano.load_hand_model(config)
  np.testing.assert_allclose(
      model_a.joint_regressor.array, mano.joint_regressor21(hand, config.tip_vertex_ids), rtol=1e-6
  )
  assert model_a.vertex_scale == config.vertex_scale
  assert model_a.num_points == 778

  @chex.assert_max_traces(n=1)
  def camera_fn(model, params, images):
    _, embedding = model.apply({'params': params}, images, method='encode')
    return model.apply({'params': params}, embedding, method='camera')

  camera_fn = jax.jit(camera_fn, static_argnums=0)
  for seed in range(3):  # a rebuilt, equal model hits the cache: one trace only
    camera = camera_fn(build_model(config), smoke_params(), smoke_images(2, seed))
  # s is positive and about INITIAL_CAMERA_SCALE at initialisation.
  assert (
      0.5 * diffhand.INITIAL_CAMERA_SCALE
      < float(camera[0, 0])
      < (2 * diffhand.INITIAL_CAMERA_SCALE)
  )


def test_bfloat16_compute_float32_params_and_outputs():
  model, model32 = build_model(smoke_config(dtype='bfloat16')), build_model(smoke_config())
  params = smoke_params()
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype('float32')}
  # bfloat16 models initialise float32 parameters of the same structure.
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), smoke_images()))
  assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), shapes) == (
      jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
  )
  run = jax.jit(
      lambda p: [
          m.apply({'params': p}, smoke_images(), jnp.zeros((2, 778, 3)), jnp.array([1, 2]))
          for m in (model, model32)
      ]
  )
  out, out32 = run(params)
  assert out['x0'].dtype == jnp.float32 and out['camera'].dtype == jnp.float32
  # The same parameters in float32 give nearly, not exactly, the same output.
  difference = np.abs(np.asarray(out['x0'] - out32['x0'])).max()
  assert 0 < difference < 0.1
  with pytest.raises(ValueError, match='dtype'):
    build_model(smoke_config(dtype='float16'))


def test_gradients_reach_every_parameter():
  """A loss with the terms of losses.py (x0, 2D camera, auxiliary joints) touches every leaf."""
  config = smoke_config()
  model = build_model(config)
  images = smoke_images()
  params = smoke_params()
  schedule = diffusion.schedule_from_config(config)
  x0 = 0.3 * jax.random.normal(jax.random.key(1), (2, 778, 3))
  t = jnp.array([10, 600])
  x_t = diffusion.q_sample(schedule, x0, t, jax.random.normal(jax.random.key(2), x0.shape))
  joints2d = jax.random.uniform(jax.random.key(3), (2, 21, 2), minval=-1, maxval=1)
  regressor = jnp.asarray(model.joint_regressor.array)

  def loss_fn(p):
    out = model.apply({'params': p}, images, x_t, t)
    joints = jnp.einsum('jn,bnd->bjd', regressor, out['x0'] * model.vertex_scale)
    uv = out['camera'][:, None, :1] * joints[..., :2] + out['camera'][:, None, 1:]
    aux = jnp.mean((out['aux_joints'] - jnp.einsum('jn,bnd->bjd', regressor, x0)) ** 2)
    return jnp.mean((out['x0'] - x0) ** 2) + jnp.mean((uv - joints2d) ** 2) + aux

  grads = jax.jit(jax.grad(loss_fn))(params)
  norms = {
      jax.tree_util.keystr(path): float(jnp.linalg.norm(leaf))
      for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
  }
  assert len(norms) > 20
  zero = [name for name, norm in norms.items() if not norm > 0]
  assert not zero, f'no gradient reaches {zero}'


def test_bad_input_raises():
  model = build_model(smoke_config())
  with pytest.raises(ValueError, match=r'images must have shape \[batch, height, width, 3\]'):
    init_params(model, jax.random.key(0), jnp.zeros((IMAGE_SIZE, IMAGE_SIZE, 3)))
  with pytest.raises(ValueError, match='images must have shape'):
    init_params(model, jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 4)))
  with pytest.raises(ValueError, match='floating'):
    init_params(model, jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8))
  with pytest.raises(ValueError, match='depth'):
    init_params(
        model,
        jax.random.key(0),
        jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)),
        depth=jnp.zeros((1, 16, 16, 1)),
    )
  config = smoke_config()
  config.decoder = 'unet'
  with pytest.raises(ValueError, match='decoder'):
    build_model(config)
  with pytest.raises(ValueError, match='joint_regressor'):
    diffhand.assemble_model(smoke_config(), model.encoder, np.zeros((778, 3)), np.zeros((16, 778)))


def test_static_array_hash_and_equality():
  a = diffhand.StaticArray(np.arange(6.0).reshape(2, 3))
  b = diffhand.StaticArray(np.arange(6.0).reshape(2, 3))
  c = diffhand.StaticArray(np.arange(6.0).reshape(3, 2))
  assert a == b and hash(a) == hash(b) and a != c
  with pytest.raises(ValueError):
    a.array[0, 0] = 1.0  # read-only


@pytest.mark.parametrize(
    'encoder,size,distilled,use_depth',
    [('vit', 'micro', False, False), ('deit', 'micro', True, True), ('hrnet', 'w8', False, True)],
)
def test_encoder_variants_shapes(encoder, size, distilled, use_depth):
  """Every encoder plugs into the model (abstract evaluation: shapes only, nothing compiled)."""
  config = smoke_config()
  config.model.encoder, config.model.encoder_size = encoder, size
  config.model.distilled, config.model.use_depth = distilled, use_depth
  model = build_model(config)
  images = jax.ShapeDtypeStruct((2, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  depth = jax.ShapeDtypeStruct((2, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32) if use_depth else None
  x_t = jax.ShapeDtypeStruct((2, 778, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  params = jax.eval_shape(lambda im, d: init_params(model, jax.random.key(0), im, d), images, depth)
  out = jax.eval_shape(lambda p, *a: model.apply({'params': p}, *a), params, images, x_t, t, depth)
  assert out['x0'].shape == (2, 778, 3) and out['x0'].dtype == jnp.float32
  assert out['camera'].shape == (2, 3)
  assert set(params) == {'encoder', 'decoder', 'camera_head', 'aux_head'}
