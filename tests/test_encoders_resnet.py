"""Tests of the GroupNorm ResNet encoder (models/resnet.py) and its place in the factory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from diffhand_jax.models import encoder
from diffhand_jax.models import resnet


def _model_config(size='micro'):
  config = synthetic.get_config('smoke').model
  config.encoder, config.encoder_size = 'resnet', size
  return config


@pytest.mark.parametrize('image_size', [64, 96])
def test_shapes_agree_with_the_factory(image_size):
  config = _model_config()
  module = encoder.build_encoder(config)
  images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
  tokens, embedding = jax.eval_shape(module.apply, variables, images)
  width = encoder.encoder_width(config)
  assert width == resnet.RESNET_SIZES['micro'].widths[3]
  assert tokens.shape == (2, encoder.num_tokens(config, image_size), width)
  assert tokens.shape[1] == (image_size // 16) ** 2
  assert embedding.shape == (2, width)


def test_tokens_and_embedding_come_from_stages_3_and_4():
  module = resnet.ResNet(spec=resnet.RESNET_SIZES['micro'])
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  variables = module.init(jax.random.PRNGKey(1), images)
  (tokens, embedding), state = module.apply(variables, images, capture_intermediates=True)
  inter = state['intermediates']
  stage3 = np.asarray(inter['stage3_block0']['__call__'][0])  # [2, 4, 4, 32]
  stage4 = np.asarray(inter['stage4_block0']['__call__'][0])  # [2, 2, 2, 64]
  assert stage3.shape == (2, 4, 4, 32) and stage4.shape == (2, 2, 2, 64)
  params = variables['params']
  # embedding: a linear map of the flattened (row-major) stage-4 map.
  pool = params['embed_pool']
  expected = stage4.reshape(2, -1) @ np.asarray(pool['kernel']) + np.asarray(pool['bias'])
  np.testing.assert_allclose(np.asarray(embedding), expected, rtol=1e-4, atol=1e-5)
  # tokens: a 1x1 convolution of the stage-3 map, row-major over the 4x4 grid, plus the
  # position embedding of each grid cell.
  proj = params['token_proj']
  kernel = np.asarray(proj['kernel'])[0, 0]  # [32, 64]
  expected = np.einsum('bhwc,cd->bhwd', stage3, kernel) + np.asarray(proj['bias'])
  expected = expected.reshape(2, 16, 64) + np.asarray(params['token_pos_embed'])
  np.testing.assert_allclose(np.asarray(tokens), expected, rtol=1e-4, atol=1e-5)


def test_rejects_sizes_off_the_stride():
  module = resnet.ResNet(spec=resnet.RESNET_SIZES['micro'])
  with pytest.raises(ValueError, match='multiple of 32'):
    jax.eval_shape(
        module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 48, 48, 3), jnp.float32)
    )


def test_depth_branch_starts_at_zero():
  module = resnet.ResNet(spec=resnet.RESNET_SIZES['micro'], use_depth=True)
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(1, 64, 64, 3)), jnp.float32)
  depth = jnp.asarray(rng.normal(size=(1, 64, 64, 1)), jnp.float32)
  variables = module.init(jax.random.PRNGKey(3), images, depth)
  plain = resnet.ResNet(spec=resnet.RESNET_SIZES['micro'])
  without = {'params': {k: v for k, v in variables['params'].items() if k != 'depth'}}
  for a, b in zip(module.apply(variables, images, depth), plain.apply(without, images)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('pretrained_path, grid', [('', 4), ('weights.safetensors', 14)])
def test_vit_position_embedding_grid(pretrained_path, grid):
  """From scratch the table is made at the input grid; for imported weights at theirs."""
  config = synthetic.get_config('smoke').model
  config.encoder, config.pretrained_path, config.pretrained_image_size = 'vit', pretrained_path, 224
  module = encoder.build_encoder(config, image_size=64)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
  assert variables['params']['pos_embed'].shape[1] == 1 + grid * grid


def test_space_to_depth_against_a_loop():
  images = np.random.default_rng(4).normal(size=(2, 6, 8, 3)).astype(np.float32)
  folded = np.asarray(resnet.space_to_depth(jnp.asarray(images), 2))
  assert folded.shape == (2, 3, 4, 12)
  for i in range(3):
    for j in range(4):
      for dy in range(2):
        for dx in range(2):
          for c in range(3):
            assert folded[1, i, j, (dy * 2 + dx) * 3 + c] == images[1, 2 * i + dy, 2 * j + dx, c]


def test_space_to_depth_model_starts_as_the_model_on_block_means():
  """A micro ResNet trained at 64 px, carried by `encoder.init_from_adapter` to a model with
  space_to_depth=2, gives on a 128 px image what the 64 px model gives on its 2x2 block means."""
  config = _model_config()
  small = encoder.build_encoder(config)
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.normal(size=(2, 128, 128, 3)), jnp.float32)
  means = images.reshape(2, 64, 2, 64, 2, 3).mean(axis=(2, 4))
  small_params = small.init(jax.random.PRNGKey(6), means)['params']
  config.space_to_depth = 2
  assert encoder.encoder_stride(config) == 32 and encoder.num_tokens(config, 128) == 16
  big = encoder.build_encoder(config)
  big_params = jax.eval_shape(big.init, jax.random.PRNGKey(7), images)['params']
  adapt = encoder.init_from_adapter(config)
  carried = jax.tree_util.tree_map_with_path(
      lambda path, want, have: (
          adapt(tuple(k.key for k in path), have, want.shape) if want.shape != have.shape else have
      ),
      big_params,
      small_params,
  )
  assert carried['stem']['conv']['kernel'].shape == (3, 3, 12, 8)
  for a, b in zip(
      big.apply({'params': carried}, images), small.apply({'params': small_params}, means)
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  # The adapter refuses what it cannot carry.
  assert adapt(('stem', 'conv', 'kernel'), np.zeros((3, 3, 4, 8)), (3, 3, 12, 8)) is None
  assert adapt(('token_proj', 'kernel'), np.zeros((1, 1, 8, 8)), (1, 1, 32, 8)) is None


def test_space_to_depth_needs_the_resnet_and_a_multiple_of_its_stride():
  config = _model_config()
  config.space_to_depth = 2
  with pytest.raises(ValueError, match='multiple of 64'):
    jax.eval_shape(
        encoder.build_encoder(config).init,
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, 96, 96, 3), jnp.float32),
    )
  config.encoder, config.encoder_size = 'vit', 'micro'
  with pytest.raises(ValueError, match='space_to_depth'):
    encoder.build_encoder(config)
  config.encoder, config.space_to_depth = 'resnet', 1
  assert encoder.init_from_adapter(config) is None
