"""Tests of diffhand_jax/sampling.py: sample / tta_sample on the smoke model and stand-ins."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax import sampling
from diffhand_jax.models import build_model
from diffhand_jax.models import diffhand
from diffhand_jax.models import init_params
from helpers import SMOKE_IMAGE_SIZE
from helpers import smoke_config
from helpers import smoke_images
from helpers import smoke_model
from helpers import smoke_params

IMAGE_SIZE = SMOKE_IMAGE_SIZE  # the smoke ResNet: 4 tokens
INTRINSICS = np.array(
    [[[60.0, 0, 15.0], [0, 62.0, 17.0], [0, 0, 1]], [[45.0, 0, 16.0], [0, 44.0, 16.5], [0, 0, 1]]],
    np.float32,
)


# The main configuration (S = 2, K = 3, with intrinsics) is compiled exactly once for the
# whole module; every call below with these shapes must hit the cache.
@chex.assert_max_traces(n=1)
def _sample_2_3(model, params, images, rng, intrinsics):
  return sampling.sample(
      model, params, images, rng, num_sampling_steps=2, num_hypotheses=3, intrinsics=intrinsics
  )


SAMPLE_2_3 = jax.jit(_sample_2_3, static_argnums=0)


@functools.cache
def _main_output():
  return SAMPLE_2_3(
      smoke_model(), smoke_params(), smoke_images(), jax.random.key(1), intrinsics=INTRINSICS
  )


def _regressor():
  return np.asarray(smoke_model().joint_regressor.array, np.float64)


def test_output_shapes_and_internal_consistency():
  out = jax.tree_util.tree_map(np.asarray, _main_output())
  assert {k: v.shape for k, v in out.items()} == {
      'vertices': (2, 778, 3),
      'joints': (2, 21, 3),
      'hypotheses': (2, 3, 778, 3),
      'vertex_std': (2, 778),
      'camera': (2, 3),
      'vertices_camera': (2, 778, 3),
      'joints_camera': (2, 21, 3),
  }
  assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in out.values())
  regressor = _regressor()
  hypotheses = out['hypotheses'].astype(np.float64)
  # Each hypothesis is centred on its own regressed wrist.
  np.testing.assert_allclose(np.einsum('n,bknd->bkd', regressor[0], hypotheses), 0, atol=1e-6)
  np.testing.assert_allclose(out['vertices'], hypotheses.mean(1), atol=1e-6)
  np.testing.assert_allclose(
      out['joints'], np.einsum('jn,bnd->bjd', regressor, out['vertices']), atol=1e-6
  )
  np.testing.assert_allclose(out['joints'][:, 0], 0, atol=1e-6)
  spread = np.sqrt(
      np.mean(np.sum((hypotheses - hypotheses.mean(1, keepdims=True)) ** 2, -1), axis=1)
  )
  np.testing.assert_allclose(out['vertex_std'], spread, rtol=1e-4, atol=1e-7)
  # Different starting noises give different hypotheses.
  assert np.abs(hypotheses[:, 0] - hypotheses[:, 1]).max() > 1e-4
  assert np.all(out['camera'][:, 0] > 0)


def test_camera_placement_reprojects_the_root():
  out = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), _main_output())
  offset = out['vertices_camera'] - out['vertices']
  root = offset[:, 0]
  np.testing.assert_allclose(offset, np.broadcast_to(root[:, None], offset.shape), atol=1e-5)
  np.testing.assert_allclose(
      out['joints_camera'] - out['joints'], np.broadcast_to(root[:, None], (2, 21, 3)), atol=1e-5
  )
  k = np.asarray(INTRINSICS, np.float64)
  for b in range(2):
    u, v, w = k[b] @ root[b]
    uv_norm = np.array([u / w, v / w]) / (IMAGE_SIZE / 2) - 1  # pixel -> [-1, 1]
    np.testing.assert_allclose(uv_norm, out['camera'][b, 1:], atol=1e-4)
    focal = (k[b, 0, 0] + k[b, 1, 1]) / 2
    assert out['camera'][b, 0] == pytest.approx(2 * focal / (IMAGE_SIZE * root[b, 2]), rel=1e-4)


def test_determinism_keys_and_a_single_compilation():
  model, params, images = smoke_model(), smoke_params(), smoke_images()
  first = _main_output()
  again = SAMPLE_2_3(model, params, images, jax.random.key(1), intrinsics=INTRINSICS)
  other = SAMPLE_2_3(model, params, images, jax.random.key(2), intrinsics=INTRINSICS)
  shifted = SAMPLE_2_3(
      build_model(smoke_config()), params, images + 0.5, jax.random.key(1), intrinsics=INTRINSICS
  )  # an equal, rebuilt model: same cache entry
  np.testing.assert_array_equal(first['hypotheses'], again['hypotheses'])
  assert np.abs(np.asarray(first['hypotheses'] - other['hypotheses'])).max() > 1e-4
  np.testing.assert_array_equal(first['camera'], other['camera'])  # the camera has no noise
  assert np.abs(np.asarray(first['camera'] - shifted['camera'])).max() > 1e-6


def test_vmap_matches_separate_calls():
  model, params = smoke_model(), smoke_params()
  images = jnp.stack([smoke_images(), smoke_images()[::-1]])
  keys = jax.random.split(jax.random.key(5), 2)
  intrinsics = jnp.stack([INTRINSICS, INTRINSICS[::-1]])
  batched = jax.jit(
      jax.vmap(
          lambda im, key, k: sampling.sample(
              model, params, im, key, num_sampling_steps=2, num_hypotheses=3, intrinsics=k
          )
      )
  )(images, keys, intrinsics)
  for i in range(2):
    single = SAMPLE_2_3(model, params, images[i], keys[i], intrinsics=intrinsics[i])
    for name in ('hypotheses', 'vertices_camera', 'vertex_std'):
      np.testing.assert_allclose(batched[name][i], single[name], rtol=1e-4, atol=1e-5)


# ---- Structure of the traced program ----


def _equations(jaxpr):
  """All equations, recursing into sub-jaxprs (scan bodies, pjit, custom_jvp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          yield from _equations(getattr(inner, 'jaxpr', inner))


def _sample_jaxpr(num_sampling_steps, num_hypotheses):
  return jax.make_jaxpr(
      functools.partial(
          sampling.sample,
          smoke_model(),
          num_sampling_steps=num_sampling_steps,
          num_hypotheses=num_hypotheses,
      )
  )(smoke_params(), smoke_images(), jax.random.key(0)).jaxpr


def _count(jaxpr, primitive):
  return sum(eqn.primitive.name == primitive for eqn in _equations(jaxpr))


def test_ddim_loop_is_one_scan_holding_the_decoder_and_flat_in_steps():
  small, large = _sample_jaxpr(2, 1), _sample_jaxpr(20, 1)
  assert _count(small, 'scan') == 1
  assert len(list(_equations(small))) == len(list(_equations(large)))
  scan = next(e for e in _equations(small) if e.primitive.name == 'scan')
  assert scan.params['length'] == 2
  assert (
      _count(large, 'scan') == 1
      and next(e for e in _equations(large) if e.primitive.name == 'scan').params['length'] == 20
  )
  # The scan body holds a whole decoder call: as many matrix products as `denoise`.
  decoder_jaxpr = jax.make_jaxpr(
      lambda p: smoke_model().apply(
          {'params': p},
          jnp.zeros((2, 778, 3)),
          jnp.zeros((2,), jnp.int32),
          jnp.zeros((2, 4, 64)),
          jnp.zeros((2, 64)),
          method='denoise',
      )
  )(smoke_params()).jaxpr
  body = scan.params['jaxpr'].jaxpr
  assert _count(body, 'dot_general') == _count(decoder_jaxpr, 'dot_general') > 10


def test_encoder_runs_once_whatever_steps_and_hypotheses():
  # Convolutions belong to the encoder (the smoke ResNet has several); the decoder has none.
  encoder_jaxpr = jax.make_jaxpr(
      lambda p: smoke_model().apply({'params': p}, smoke_images(), method='encode')
  )(smoke_params()).jaxpr
  encoder_convs = _count(encoder_jaxpr, 'conv_general_dilated')
  assert encoder_convs >= 1
  for steps, hypotheses in ((1, 1), (2, 1), (5, 4), (10, 16)):
    jaxpr = _sample_jaxpr(steps, hypotheses)
    assert _count(jaxpr, 'conv_general_dilated') == encoder_convs, (steps, hypotheses)
    scan = next(e for e in _equations(jaxpr) if e.primitive.name == 'scan')
    assert _count(scan.params['jaxpr'].jaxpr, 'conv_general_dilated') == 0


# ---- Aggregation, regressor mode, errors ----


def test_summarise_medoid_and_mean_against_naive_loops():
  rng = np.random.default_rng(0)
  hypotheses = rng.normal(size=(2, 5, 778, 3)).astype(np.float32)
  camera = jnp.array([[8.0, 0.1, -0.2], [9.0, 0.0, 0.3]])
  regressor = _regressor()
  centred = hypotheses - np.einsum('n,bknd->bkd', regressor[0], hypotheses)[:, :, None]
  for aggregate in ('mean', 'medoid'):
    out = sampling._summarise(
        smoke_model(), jnp.asarray(hypotheses), camera, aggregate, None, IMAGE_SIZE
    )
    for b in range(2):
      if aggregate == 'mean':
        expected = centred[b].mean(0)
      else:
        totals = [
            sum(np.linalg.norm(centred[b, i] - centred[b, j], axis=-1).mean() for j in range(5))
            for i in range(5)
        ]
        expected = centred[b, int(np.argmin(totals))]
      np.testing.assert_allclose(out['vertices'][b], expected, rtol=1e-5, atol=1e-5)
    assert 'vertices_camera' not in out


def test_single_hypothesis_has_zero_spread():
  out = sampling._summarise(
      smoke_model(), jnp.ones((2, 1, 778, 3)), jnp.ones((2, 3)), 'medoid', None, IMAGE_SIZE
  )
  np.testing.assert_array_equal(out['vertex_std'], 0)


def test_regressor_mode_returns_the_direct_prediction():
  model = build_model(smoke_config(use_diffusion=False))
  params, images = smoke_params(), smoke_images()
  out = jax.jit(functools.partial(sampling.sample, model, num_sampling_steps=4, num_hypotheses=3))(
      params, images, jax.random.key(3)
  )
  direct = np.asarray(
      model.apply({'params': params}, images, jnp.zeros((2, 778, 3)), jnp.zeros((2,), jnp.int32))[
          'x0'
      ],
      np.float64,
  )
  direct *= model.vertex_scale
  direct -= np.einsum('n,bnd->bd', _regressor()[0], direct)[:, None]
  hypotheses = np.asarray(out['hypotheses'])
  for k in range(3):
    np.testing.assert_allclose(hypotheses[:, k], direct, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out['vertex_std'], 0, atol=1e-6)


def test_noise_scale_zero_starts_every_hypothesis_at_zero():
  # One step from x_T = 0 is the decoder applied once at t = T - 1 to zeros: every key and
  # every hypothesis gives that same mesh (a naive computation through model.apply).
  model, params, images = smoke_model(), smoke_params(), smoke_images()
  run = jax.jit(
      functools.partial(
          sampling.sample, model, num_sampling_steps=1, num_hypotheses=3, noise_scale=0.0
      )
  )
  out, other_key = run(params, images, jax.random.key(3)), run(params, images, jax.random.key(4))
  t_last = jnp.full((2,), model.num_timesteps - 1, jnp.int32)
  direct = np.asarray(
      model.apply({'params': params}, images, jnp.zeros((2, 778, 3)), t_last)['x0'], np.float64
  )
  direct *= model.vertex_scale
  direct -= np.einsum('n,bnd->bd', _regressor()[0], direct)[:, None]
  for k in range(3):
    np.testing.assert_allclose(out['hypotheses'][:, k], direct, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(out['hypotheses'], other_key['hypotheses'])
  # A scale of 1 (the default) draws a different start per key.
  default = sampling.sample(model, params, images, jax.random.key(3), num_sampling_steps=1)
  assert np.abs(np.asarray(default['hypotheses'][:, 0]) - direct).max() > 1e-4


def _one_nan(shape, index):
  """Zeros of `shape` with a NaN at `index` (numpy: nothing runs JAX at collection)."""
  array = np.zeros(shape, np.float32)
  array[index] = np.nan
  return array


@pytest.mark.parametrize(
    'change,message',
    [
        (dict(images=np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)), 'images must have shape'),
        (
            dict(images=np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)),
            'images must have shape',
        ),
        (dict(images=np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.int32)), 'floating'),
        (dict(num_sampling_steps=0), 'num_sampling_steps'),
        (dict(num_sampling_steps=2.5), 'num_sampling_steps'),
        (dict(num_sampling_steps=1001), 'num_sampling_steps'),
        (dict(num_hypotheses=0), 'num_hypotheses'),
        (dict(depth=np.zeros((2, 16, 16, 1), np.float32)), 'depth'),
        (dict(aggregate='median'), 'aggregate'),
        (dict(noise_scale=-1.0), 'noise_scale'),
        (dict(noise_scale=float('nan')), 'noise_scale'),
        (dict(intrinsics=np.zeros((2, 3), np.float32)), 'intrinsics'),
        (dict(images=_one_nan((2, IMAGE_SIZE, IMAGE_SIZE, 3), (1, 2, 3, 0))), 'NaN'),
        (
            dict(depth=np.full((2, IMAGE_SIZE, IMAGE_SIZE, 1), np.inf, np.float32)),
            'NaN or infinite',
        ),
    ],
)
def test_bad_input_raises_before_tracing(change, message):
  kwargs = dict(images=smoke_images(), num_sampling_steps=2, num_hypotheses=1)
  # The parameters are numpy (collection runs no JAX); the sampler gets jax arrays.
  kwargs.update({k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in change.items()})
  images = kwargs.pop('images')
  # Params are never touched: validation comes first.
  with pytest.raises(ValueError, match=message):
    sampling.sample(smoke_model(), None, images, jax.random.key(0), **kwargs)
  with pytest.raises(ValueError, match=message):
    sampling.tta_sample(smoke_model(), None, images, jax.random.key(0), **kwargs)


# ---- Test-time augmentation ----


def test_rotate_images_convention():
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  np.testing.assert_array_equal(sampling.rotate_images(images, 0.0), images)
  # +90 degrees maps offset (u, v) to (-v, u): np.rot90 with k = -1 over (rows, cols).
  np.testing.assert_allclose(
      sampling.rotate_images(images, 90.0),
      np.rot90(np.asarray(images), k=-1, axes=(1, 2)),
      atol=1e-5,
  )
  np.testing.assert_allclose(
      sampling.rotate_images(images, -90.0),
      np.rot90(np.asarray(images), k=1, axes=(1, 2)),
      atol=1e-5,
  )


def test_tta_with_angle_zero_equals_sample():
  out = jax.jit(
      functools.partial(sampling.tta_sample, angles=(0.0,), num_sampling_steps=2, num_hypotheses=3),
      static_argnums=0,
  )(smoke_model(), smoke_params(), smoke_images(), jax.random.key(1), intrinsics=INTRINSICS)
  reference = _main_output()
  for name in reference:
    np.testing.assert_allclose(out[name], reference[name], rtol=1e-5, atol=1e-6)


class _CentroidEncoder(nn.Module):
  """Embedding = intensity centroid (u, v) of channel 0, normalised to [-1, 1]."""

  @nn.compact
  def __call__(self, images, depth=None):
    _, height, width, _ = images.shape
    weight = images[..., 0]
    rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing='ij')
    u = (cols - (width - 1) / 2) / (width / 2)
    v = (rows - (height - 1) / 2) / (height / 2)
    centroid = jnp.stack([jnp.sum(weight * u, (1, 2)), jnp.sum(weight * v, (1, 2))], -1)
    centroid /= jnp.sum(weight, (1, 2))[:, None]
    return centroid[:, None, :], centroid


class _LinearDecoder(nn.Module):
  """x0[n] = (a_n * centroid, z_n): follows in-plane rotations of the image; ignores x_t."""

  num_points: int = 778

  @nn.compact
  def __call__(self, x_t, t, tokens, embedding):
    index = jnp.arange(self.num_points, dtype=jnp.float32)
    xy = jnp.sin(index)[None, :, None] * embedding[:, None, :]
    z = jnp.broadcast_to(jnp.cos(index)[None, :, None], xy.shape[:2] + (1,))
    return jnp.concatenate([xy, z], axis=-1)


def _equivariant_model_and_params():
  model = diffhand.DiffHand(
      encoder=_CentroidEncoder(),
      decoder=_LinearDecoder(),
      joint_regressor=smoke_model().joint_regressor,
  )
  params = init_params(model, jax.random.key(0), smoke_images())
  # Camera translation = 0.5 * centroid, raw scale 0: equivariant like the mesh.
  params = {
      'camera_head': {'kernel': jnp.array([[0.0, 0.5, 0.0], [0.0, 0.0, 0.5]]), 'bias': jnp.zeros(3)}
  }
  rows, cols = np.meshgrid(np.arange(IMAGE_SIZE), np.arange(IMAGE_SIZE), indexing='ij')
  blob = np.exp(-((cols - 15.5 - 6) ** 2 + (rows - 15.5 + 4) ** 2) / (2 * 2.5**2))
  images = jnp.asarray(
      np.broadcast_to(blob[None, :, :, None], (1, IMAGE_SIZE, IMAGE_SIZE, 3)), jnp.float32
  )
  return model, params, images


def test_equivariant_model_rotation_convention_and_tta():
  model, params, images = _equivariant_model_and_params()
  plain = sampling.sample(model, params, images, jax.random.key(0), num_sampling_steps=2)
  rotated = sampling.sample(
      model, params, sampling.rotate_images(images, 30.0), jax.random.key(0), num_sampling_steps=2
  )
  xy, xy_rotated = np.asarray(plain['vertices'][0, :, :2]), np.asarray(
      rotated['vertices'][0, :, :2]
  )
  scale = np.abs(xy).max()
  rotation = np.asarray(sampling.rotation_2d(30.0))
  # Rotating the image by +30 rotates the prediction's (x, y) by R(+30), not R(-30).
  np.testing.assert_allclose(xy_rotated, xy @ rotation.T, atol=2e-3 * scale)
  assert np.abs(xy_rotated - xy @ rotation).max() > 0.1 * scale
  np.testing.assert_allclose(
      rotated['camera'][0, 1:], rotation @ np.asarray(plain['camera'][0, 1:]), atol=2e-3
  )
  # So TTA, which rotates the predictions back, reproduces the plain answer.
  tta = sampling.tta_sample(
      model,
      params,
      images,
      jax.random.key(0),
      angles=(-30.0, 0.0, 45.0),
      num_sampling_steps=2,
      num_hypotheses=2,
  )
  assert tta['hypotheses'].shape == (1, 6, 778, 3)
  for name in ('vertices', 'joints', 'camera'):
    np.testing.assert_allclose(tta[name], plain[name], atol=2e-3 * max(scale, 1))
