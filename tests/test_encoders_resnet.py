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
