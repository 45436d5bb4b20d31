"""Tests of the ViT / DeiT encoder, its building blocks and `build_encoder`."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax.models import encoder
from diffhand_jax.models import layers
from diffhand_jax.models import vit
from encoder_testing import abstract_encoder_outputs
from encoder_testing import model_config
from encoder_testing import random_array
from encoder_testing import random_variables

# Published timm parameter counts (timm model cards / `sum(p.numel())`), 224 px, patch 16.
TIMM_VIT_TINY_WITH_HEAD = 5_717_416  # vit_tiny_patch16_224, 5.72 M
TIMM_DEIT_BASE_WITH_HEAD = 86_567_656  # deit_base_patch16_224, 86.6 M
IMAGENET_CLASSES = 1000


def random_images(seed, batch, size):
  return random_array(seed, (batch, size, size, 3))


# ---- Numpy reference (float64), written from the ViT / timm definitions ----


def np_layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_dense(x, p):
  return x @ np.asarray(p['kernel'], np.float64) + p['bias']


def np_attention(x, p, num_heads):
  """Per-example, per-head loop; qkv columns are q | k | v, heads contiguous in each."""
  batch, tokens, width = x.shape
  head_dim = width // num_heads
  qkv = np_dense(x, p['qkv'])
  out = np.zeros_like(x)
  for b in range(batch):
    for h in range(num_heads):
      cols = slice(h * head_dim, (h + 1) * head_dim)
      q = qkv[b, :, :width][:, cols]
      k = qkv[b, :, width : 2 * width][:, cols]
      v = qkv[b, :, 2 * width :][:, cols]
      logits = q @ k.T / math.sqrt(head_dim)
      weights = np.exp(logits - logits.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      out[b, :, cols] = weights @ v
  return np_dense(out, p['proj'])


def np_vit(params, images, num_heads, patch, num_prefix, pos_embed):
  """Reference forward; `pos_embed` [1, prefix + grid, D] already at the input's grid."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  images = np.asarray(images, np.float64)
  batch, height, width_px, _ = images.shape
  gh, gw = height // patch, width_px // patch
  # Patch embedding as a matmul over flattened (row, col, channel) patches.
  patches = images.reshape(batch, gh, patch, gw, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  kernel = p['patch_embed']['kernel']
  x = patches.reshape(batch, gh * gw, -1) @ kernel.reshape(-1, kernel.shape[-1])
  x = x + p['patch_embed']['bias']
  prefix = [p['cls_token']] + ([p['dist_token']] if num_prefix == 2 else [])
  prefix = np.concatenate([np.repeat(t, batch, 0) for t in prefix], axis=1)
  x = np.concatenate([prefix, x], axis=1) + np.asarray(pos_embed, np.float64)
  i = 0
  while f'block{i}' in p:
    blk = p[f'block{i}']
    x = x + np_attention(np_layer_norm(x, blk['norm1']), blk['attn'], num_heads)
    h = np_gelu(np_dense(np_layer_norm(x, blk['norm2']), blk['mlp']['fc1']))
    x = x + np_dense(h, blk['mlp']['fc2'])
    i += 1
  x = np_layer_norm(x, p['norm'])
  return x[:, num_prefix:], x[:, :num_prefix].mean(1)


def np_bicubic_aa_matrix(in_size, out_size):
  """PIL / PyTorch antialiased bicubic as a loop over outputs and their taps (a = -0.5)."""

  def keys(d, a=-0.5):
    d = abs(d)
    if d < 1:
      return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
      return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0

  scale = in_size / out_size
  stretch = max(scale, 1.0)  # widen the kernel when downsampling (antialiasing)
  matrix = np.zeros((out_size, in_size))
  for i in range(out_size):
    centre = (i + 0.5) * scale
    for j in range(in_size):  # taps outside the grid simply do not exist
      matrix[i, j] = keys((j + 0.5 - centre) / stretch)
    matrix[i] /= matrix[i].sum()
  return matrix


# ---- Building blocks ----


def test_exact_gelu_matches_erf_and_differs_from_tanh():
  x = np.linspace(-4.0, 4.0, 801)
  for cpu in (False, True):
    exact = np.asarray(layers.gelu(jnp.asarray(x, jnp.float32), cpu))
    np.testing.assert_allclose(exact, np_gelu(x), atol=2e-6)
  tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
  np.testing.assert_allclose(jax.nn.gelu(x, approximate=True), tanh, atol=2e-6)
  assert np.abs(exact - tanh).max() > 1e-4  # the choice is observable


def test_self_attention_matches_per_head_loop():
  module = layers.SelfAttention(num_heads=4)
  x = random_array(0, (2, 7, 32))
  params = random_variables(module, x)['params']  # non-zero biases: their placement counts
  ref = np_attention(np.asarray(x, np.float64), jax.tree.map(np.asarray, params), 4)
  np.testing.assert_allclose(module.apply({'params': params}, x), ref, atol=2e-5)


def test_self_attention_rejects_indivisible_heads():
  with pytest.raises(ValueError, match='num_heads'):
    layers.SelfAttention(num_heads=3).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 8)))


# ---- Position embedding resampling ----


def test_resample_identity_when_grid_unchanged():
  pos = random_array(0, (1, 2 + 5 * 6, 8))
  np.testing.assert_array_equal(vit.resample_pos_embed(pos, (5, 6), (5, 6), 2), pos)


@pytest.mark.parametrize(
    'old_grid,new_grid',
    [((14, 14), (8, 8)), ((14, 14), (20, 20)), ((4, 6), (7, 3)), ((4, 4), (4, 9))],
)
def test_resample_matches_loop_reference(old_grid, new_grid):
  prefix, dim = 2, 5
  pos = random_array(1, (1, prefix + old_grid[0] * old_grid[1], dim))
  out = np.asarray(vit.resample_pos_embed(pos, old_grid, new_grid, prefix))
  assert out.shape == (1, prefix + new_grid[0] * new_grid[1], dim)
  np.testing.assert_array_equal(out[:, :prefix], pos[:, :prefix])  # class / dist untouched
  grid = np.asarray(pos[0, prefix:], np.float64).reshape(*old_grid, dim)
  rows = np_bicubic_aa_matrix(old_grid[0], new_grid[0])
  cols = np_bicubic_aa_matrix(old_grid[1], new_grid[1])
  ref = np.einsum('Yy,Xx,yxd->YXd', rows, cols, grid).reshape(-1, dim)
  np.testing.assert_allclose(out[0, prefix:], ref, atol=1e-5)


def test_resample_keeps_constants_and_upsampled_ramps():
  # Weights sum to one: a constant grid stays constant. Upsampling a linear ramp keeps it
  # linear away from the borders (Keys' kernel reproduces polynomials up to degree 2).
  const = jnp.full((1, 1 + 36, 3), 0.7)
  np.testing.assert_allclose(vit.resample_pos_embed(const, (6, 6), (4, 9), 1), 0.7, atol=1e-6)
  old, new = 8, 16
  ramp = np.add.outer(np.arange(old), 2.0 * np.arange(old))  # value = row + 2 col
  out = vit.resample_pos_embed(
      jnp.asarray(ramp.reshape(1, -1, 1), jnp.float32), (old, old), (new, new)
  )
  out = np.asarray(out).reshape(new, new)
  centres = (np.arange(new) + 0.5) * old / new - 0.5  # output centres in input coordinates
  expected = np.add.outer(centres, 2.0 * centres)
  np.testing.assert_allclose(out[3:-3, 3:-3], expected[3:-3, 3:-3], atol=1e-5)


def test_resample_rejects_inconsistent_shape():
  with pytest.raises(ValueError, match='prefix'):
    vit.resample_pos_embed(jnp.zeros((1, 10, 4)), (3, 3), (4, 4), 2)


def test_resample_matches_pytorch_when_installed():
  torch = pytest.importorskip('torch')
  pos = np.random.default_rng(0).normal(size=(1, 1 + 14 * 14, 6))
  out = vit.resample_pos_embed(jnp.asarray(pos, jnp.float32), (14, 14), (8, 8), 1)
  grid = torch.from_numpy(pos[:, 1:].reshape(1, 14, 14, 6)).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(8, 8), mode='bicubic', antialias=True)
  ref = ref.permute(0, 2, 3, 1).reshape(1, 64, 6).numpy()
  np.testing.assert_allclose(np.asarray(out)[:, 1:], ref, atol=1e-5)


# ---- Whole encoder ----


@pytest.mark.parametrize('distilled,image_size', [(False, 64), (False, 32), (True, 48)])
def test_vit_matches_numpy_reference(distilled, image_size):
  # pretrained_image_size=64: at 32 / 48 px the position embedding is resampled on the fly.
  config = model_config('deit' if distilled else 'vit', 'micro', distilled)
  module = encoder.build_encoder(config)
  images = random_images(0, 2, image_size)
  params = random_variables(module, images, seed=1)['params']
  tokens, embedding = jax.jit(module.apply)({'params': params}, images)
  prefix = 2 if distilled else 1
  grid = image_size // 16
  pos = np.asarray(params['pos_embed'], np.float64)
  rows = np_bicubic_aa_matrix(4, grid)
  patch_pos = np.einsum('Yy,Xx,yxd->YXd', rows, rows, pos[0, prefix:].reshape(4, 4, -1))
  pos = np.concatenate([pos[:, :prefix], patch_pos.reshape(1, grid * grid, -1)], axis=1)
  ref_tokens, ref_embedding = np_vit(params, images, 2, 16, prefix, pos)
  assert tokens.shape == (2, grid * grid, 64) and embedding.shape == (2, 64)
  np.testing.assert_allclose(tokens, ref_tokens, atol=2e-4)
  np.testing.assert_allclose(embedding, ref_embedding, atol=2e-4)


@pytest.mark.parametrize(
    'size,image_size', [('micro', 32), ('micro', 64), ('tiny', 32), ('tiny', 48)]
)
def test_vit_shapes(size, image_size):
  # Shapes only: jax.eval_shape traces without compiling (numerics: the reference tests).
  config = model_config('vit', size)
  variables, tokens, embedding = abstract_encoder_outputs(config, image_size)
  width = encoder.encoder_width(config)
  assert width == vit.VIT_SIZES[size][1]
  assert encoder.num_tokens(config, image_size) == (image_size // 16) ** 2
  assert tokens.shape == (2, encoder.num_tokens(config, image_size), width)
  assert embedding.shape == (2, width)
  assert variables['params']['pos_embed'].shape == (1, 1 + (64 // 16) ** 2, width)


def test_deit_distilled_embedding_is_mean_of_prefix_tokens():
  config = model_config('deit', 'micro', distilled=True)
  module = encoder.build_encoder(config)
  images = random_images(3, 2, 32)
  variables = random_variables(module, images)
  assert variables['params']['dist_token'].shape == (1, 1, 64)
  assert variables['params']['pos_embed'].shape == (1, 2 + 16, 64)
  # Capture the normed sequence to check the embedding independently of the module's slicing.
  apply = jax.jit(lambda v, x: module.apply(v, x, capture_intermediates=True))
  (tokens, embedding), state = apply(variables, images)
  chex.assert_shape(tokens, (2, 4, 64))
  normed = state['intermediates']['norm']['__call__'][0]
  np.testing.assert_allclose(embedding, (normed[:, 0] + normed[:, 1]) / 2, atol=1e-6)
  np.testing.assert_allclose(tokens, normed[:, 2:], atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
  config = model_config('vit', 'micro')
  images = random_images(0, 2, 32)
  module32 = encoder.build_encoder(config)
  module16 = encoder.build_encoder(config, dtype='bfloat16')
  shapes = jax.eval_shape(module16.init, jax.random.PRNGKey(0), images)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
  variables = random_variables(module16, images)
  tokens16, embedding16 = jax.jit(module16.apply)(variables, images)
  tokens32, _ = jax.jit(module32.apply)(variables, images)
  assert tokens16.dtype == jnp.bfloat16 and embedding16.dtype == jnp.bfloat16
  # LayerNorm-ed tokens are O(1); bfloat16 keeps ~3 significant digits.
  np.testing.assert_allclose(tokens16.astype(jnp.float32), tokens32, atol=0.1)
  assert float(jnp.abs(tokens16.astype(jnp.float32) - tokens32).mean()) < 0.02


def test_jit_traces_once_for_repeated_calls():
  config = model_config('vit', 'micro')
  module = encoder.build_encoder(config)
  images = random_images(0, 2, 32)
  variables = random_variables(module, images)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def encode(variables, images):
    return module.apply(variables, images)

  for seed in range(3):
    encode(variables, random_images(seed, 2, 32))


@pytest.mark.parametrize(
    'shape,match',
    [
        ((2, 32, 32), r'\[batch, H, W, 3\]'),
        ((2, 32, 32, 1), r'\[batch, H, W, 3\]'),
        ((2, 40, 32, 3), 'multiple of patch'),
    ],
)
def test_vit_rejects_bad_images(shape, match):
  module = encoder.build_encoder(model_config('vit', 'micro'))
  with pytest.raises(ValueError, match=match):
    module.init(jax.random.PRNGKey(0), jnp.zeros(shape))


@pytest.mark.parametrize(
    'changes,match',
    [
        (dict(encoder='convnext'), 'model.encoder'),
        (dict(encoder_size='huge'), 'encoder_size'),
        (dict(encoder_size='w32'), 'encoder_size'),
        (dict(distilled=True), 'deit'),
    ],
)
def test_build_encoder_rejects_bad_config(changes, match):
  config = model_config('vit', 'micro')
  config.update(changes)
  with pytest.raises(ValueError, match=match):
    encoder.build_encoder(config)


# ---- Parameter counts of the standard sizes (jax.eval_shape: no memory) ----


def count_params(config, image_size=224):
  module = encoder.build_encoder(config)
  shapes = jax.eval_shape(
      module.init,
      jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
  )
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def test_parameter_counts_match_timm():
  head = lambda width: width * IMAGENET_CLASSES + IMAGENET_CLASSES  # timm's classifier
  tiny = count_params(model_config('vit', 'tiny', pretrained_image_size=224))
  assert tiny == TIMM_VIT_TINY_WITH_HEAD - head(192)  # 5,524,416 without the head
  base = count_params(model_config('deit', 'base', pretrained_image_size=224))
  assert base + head(768) == TIMM_DEIT_BASE_WITH_HEAD
  # The distillation token adds one token and one position embedding row.
  distilled = count_params(model_config('deit', 'base', True, pretrained_image_size=224))
  assert distilled - base == 2 * 768


@pytest.mark.parametrize('name,size', [('vit', 'micro'), ('deit', 'tiny'), ('hrnet', 'w8')])
def test_encoders_are_hashable_static_arguments(name, size):
  # DiffHand holds the encoder and is passed to jit as a static argument.
  config = model_config(name, size, distilled=name == 'deit')
  first = encoder.build_encoder(config, 'bfloat16')
  second = encoder.build_encoder(config, jnp.bfloat16)
  assert first == second and hash(first) == hash(second)
  assert first != encoder.build_encoder(config)  # the dtype is part of the identity
