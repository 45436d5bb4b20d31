"""Pretrained-weight import checked numerically against timm (optional extra: torch + timm).

Run with `make test-torch` (creates .venv-torch). In the main venv, without torch/timm, the
whole module is skipped with the reason printed (`pytest -rs`).

Each test builds a timm model with random weights (every parameter and BatchNorm statistic
perturbed, so a transposed or swapped tensor cannot hide behind a zero bias or unit scale),
saves its state dict as .safetensors, imports it with `weights.load_timm_checkpoint`, runs our
encoder on the same input, and compares features: max abs difference <= 1e-4 (float32).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason='optional extra torch + timm not installed (make test-torch)'
)
timm = pytest.importorskip('timm', reason='optional extra timm not installed (make test-torch)')
safetensors_torch = pytest.importorskip(
    'safetensors.torch', reason='safetensors not installed (make test-torch)'
)

# pylint: disable=g-import-not-at-top,wrong-import-position
from diffhand_jax import weights
from diffhand_jax.models import encoder as encoder_lib
from encoder_testing import model_config

TOLERANCE = 1e-4


def random_timm_model(name, seed, calibration_size=None, residual_gamma=1.0, **kwargs):
  """timm model `name` (no download) with every parameter and BatchNorm statistic perturbed.

  With `calibration_size`, BatchNorm statistics are first set from one training-mode pass over
  random images of that size (so eval-mode activations stay O(1) through HRNet's ~100 layers
  instead of growing to ~1e9, where float32 rounding alone exceeds the tolerance), then
  perturbed. `residual_gamma` scales the last BatchNorm of every residual branch, as trained
  ResNets have it (timm's zero_init_last starts it at 0): the residual stream then grows
  slowly with depth, as in a trained network, instead of by ~sqrt(2) per block.
  """
  torch.manual_seed(seed)  # timm's own initialisation draws from the global generator
  model = timm.create_model(name, pretrained=False, **kwargs)
  generator = torch.Generator().manual_seed(seed)

  def noise(shape, scale):
    return scale * torch.randn(shape, generator=generator)

  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim == 1 and pname.endswith('weight'):  # norm scales
        p.copy_(1.0 + noise(p.shape, 0.1))
      elif p.ndim == 1:  # biases
        p.copy_(noise(p.shape, 0.05))
      else:  # kernels and token tables: keep init scale
        p.add_(noise(p.shape, 0.2 * float(p.std()) + 1e-3))
    from timm.models import resnet  # pylint: disable=g-import-not-at-top

    for m in model.modules():
      if isinstance(m, resnet.BasicBlock):
        m.bn2.weight.mul_(residual_gamma)
      elif isinstance(m, resnet.Bottleneck):
        m.bn3.weight.mul_(residual_gamma)
    if calibration_size:
      batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
      for m in batch_norms:
        m.momentum = 1.0  # running statistics := this batch's statistics
      model.train()
      model(torch.from_numpy(images_nchw(seed + 100, 4, calibration_size)))
      for m in batch_norms:
        # A near-constant channel (tiny batch variance) would divide by ~sqrt(eps) and amplify
        # float32 rounding 100-fold in both implementations: keep variances within 4x of the
        # layer's mean.
        m.running_var.clamp_(min=0.25 * float(m.running_var.mean()))
        m.running_mean.add_(noise(m.running_mean.shape, 0.1) * m.running_var.sqrt())
        m.running_var.mul_(0.8 + 0.4 * torch.rand(m.running_var.shape, generator=generator))
  return model.eval()


def save_safetensors(model, path):
  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  safetensors_torch.save_file(state, os.fspath(path))
  return path


def images_nchw(seed, batch, size):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, 3, size, size)).astype(np.float32)


def run_ours(config, params, images):
  module = encoder_lib.build_encoder(config)
  x = jnp.asarray(images.transpose(0, 2, 3, 1))
  tokens, embedding = jax.jit(module.apply)({'params': params}, x)
  return np.asarray(tokens), np.asarray(embedding)


def report(name, tokens, ref_tokens, embedding, ref_embedding):
  assert tokens.shape == ref_tokens.shape and embedding.shape == ref_embedding.shape
  diff_tokens = float(np.abs(tokens - ref_tokens).max())
  diff_embedding = float(np.abs(embedding - ref_embedding).max())
  scale = float(np.abs(ref_tokens).max())
  print(
      f'{name}: max|tokens - timm| = {diff_tokens:.2e}, max|embedding - timm| = '
      f'{diff_embedding:.2e} (max|timm tokens| = {scale:.2f})'
  )
  # float32 rounding grows with the values' size: the bound is relative to the largest one
  # (HRNet-W32's tokens reach ~22, where 1.2e-4 apart is 5.6e-6 of them; a wrong weight
  # mapping is off by O(1)).
  bound = TOLERANCE * max(1.0, scale)
  assert diff_tokens <= bound and diff_embedding <= bound


# ---- ViT / DeiT ----
VIT_CASES = [
    # timm name, our encoder, size, distilled
    ('vit_tiny_patch16_224', 'vit', 'tiny', False),
    ('deit_tiny_patch16_224', 'deit', 'tiny', False),
    ('deit_tiny_distilled_patch16_224', 'deit', 'tiny', True),
]


def timm_vit_features(model, images, num_prefix):
  with torch.no_grad():
    x = model.forward_features(torch.from_numpy(images)).numpy()
  return x[:, num_prefix:], x[:, :num_prefix].mean(axis=1)


@pytest.mark.parametrize('timm_name,encoder,size,distilled', VIT_CASES)
def test_vit_matches_timm(tmp_path, timm_name, encoder, size, distilled):
  model = random_timm_model(timm_name, seed=1 + [c[0] for c in VIT_CASES].index(timm_name))
  path = save_safetensors(model, tmp_path / f'{timm_name}.safetensors')
  config = model_config(encoder, size, distilled, pretrained_image_size=224)
  params = weights.load_timm_checkpoint(path, config)
  images = images_nchw(2, 2, 224)
  ref_tokens, ref_embedding = timm_vit_features(model, images, 2 if distilled else 1)
  tokens, embedding = run_ours(config, params, images)
  report(timm_name, tokens, ref_tokens, embedding, ref_embedding)


def test_vit_other_input_size_matches_timm_dynamic(tmp_path):
  """A 224 px checkpoint at 160 px input: our on-the-fly resampling vs timm's dynamic size."""
  model = random_timm_model('deit_tiny_patch16_224', seed=3, dynamic_img_size=True)
  path = save_safetensors(model, tmp_path / 'deit.safetensors')
  images = images_nchw(4, 2, 160)
  ref_tokens, ref_embedding = timm_vit_features(model, images, 1)
  # (a) pos_embed kept on the 14x14 grid, resampled by the model at run time;
  config = model_config('deit', 'tiny', pretrained_image_size=224)
  tokens, embedding = run_ours(config, weights.load_timm_checkpoint(path, config), images)
  report('deit_tiny 224->160 (model)', tokens, ref_tokens, embedding, ref_embedding)
  # (b) pos_embed resampled to a 10x10 grid by the import (config pretrained size 160).
  config = model_config('deit', 'tiny', pretrained_image_size=160)
  params = weights.load_timm_checkpoint(path, config)
  assert params['pos_embed'].shape == (1, 1 + 10 * 10, 192)
  tokens, embedding = run_ours(config, params, images)
  report('deit_tiny 224->160 (import)', tokens, ref_tokens, embedding, ref_embedding)


def test_pth_state_dict_reads_like_safetensors(tmp_path):
  model = random_timm_model('deit_tiny_patch16_224', seed=5)
  torch.save({'model': model.state_dict()}, tmp_path / 'deit.pth')
  save_safetensors(model, tmp_path / 'deit.safetensors')
  config = model_config('deit', 'tiny', pretrained_image_size=224)
  a = weights.load_timm_checkpoint(tmp_path / 'deit.pth', config)
  b = weights.load_timm_checkpoint(tmp_path / 'deit.safetensors', config)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ---- HRNet (frozen BatchNorm form) ----
def timm_hrnet_features(model, images):
  """timm's high-resolution branch after stage 4, as our [B, H/4*W/4, C] tokens."""
  with torch.no_grad():
    x = torch.from_numpy(images).to(next(model.parameters()).dtype)
    x = model.act1(model.bn1(model.conv1(x)))
    x = model.act2(model.bn2(model.conv2(x)))
    high = model.stages(x)[0].numpy()
  tokens = high.transpose(0, 2, 3, 1).reshape(high.shape[0], -1, high.shape[1])
  return tokens, tokens.mean(axis=1)


HRNET_CASES = [('hrnet_w32', 'w32')]


def hrnet_config(size):
  config = model_config('hrnet', size)
  config.hrnet_norm = 'frozen_bn'
  return config


@pytest.mark.parametrize('timm_name,size', HRNET_CASES)
def test_hrnet_frozen_bn_matches_timm_eval(tmp_path, timm_name, size):
  model = random_timm_model(timm_name, seed=7, calibration_size=64, residual_gamma=0.25)
  path = save_safetensors(model, tmp_path / f'{timm_name}.safetensors')
  config = hrnet_config(size)
  params = weights.load_timm_checkpoint(path, config)
  images = images_nchw(8, 2, 64)
  ref_tokens, ref_embedding = timm_hrnet_features(model, images)
  tokens, embedding = run_ours(config, params, images)
  report(f'{timm_name} (frozen BatchNorm, eval)', tokens, ref_tokens, embedding, ref_embedding)


@pytest.mark.parametrize('timm_name,size', HRNET_CASES)
def test_hrnet_frozen_bn_matches_timm_eval_float64(timm_name, size):
  """The same comparison in float64, with unit residual gammas: the mapping and the BatchNorm
  folding are exact (differences ~1e-12), so what float32 shows is rounding alone; in float32
  this less well conditioned network differs by ~6e-4 from timm, and timm's own float32 run
  differs by ~4e-4 from its float64 one."""
  model = random_timm_model(timm_name, seed=9, calibration_size=64).double()
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  config = hrnet_config(size)
  params = weights.convert_state_dict(state, config)
  images = images_nchw(10, 2, 64)
  ref_tokens, ref_embedding = timm_hrnet_features(model, images)
  module = encoder_lib.build_encoder(config, jnp.float64)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    tokens, embedding = module.apply(
        {'params': params}, jnp.asarray(images.transpose(0, 2, 3, 1), jnp.float64)
    )
    tokens, embedding = np.asarray(tokens), np.asarray(embedding)
  assert tokens.dtype == np.float64
  diff = float(np.abs(tokens - ref_tokens).max())
  print(f'{timm_name} float64: max|tokens - timm| = {diff:.2e}')
  assert diff <= 1e-9 and float(np.abs(embedding - ref_embedding).max()) <= 1e-9


def test_hrnet_group_norm_config_refuses_batchnorm_weights(tmp_path):
  model = timm.create_model('hrnet_w32', pretrained=False)
  path = save_safetensors(model, tmp_path / 'hrnet.safetensors')
  with pytest.raises(ValueError, match='hrnet_norm="frozen_bn"'):
    weights.load_timm_checkpoint(path, model_config('hrnet', 'w32'))


@pytest.mark.parametrize(
    'timm_name,config_args',
    [
        ('hrnet_w48', ('hrnet', 'w48')),
        ('hrnet_w64', ('hrnet', 'w64')),
        ('deit_small_distilled_patch16_224', ('deit', 'small', True)),
        ('vit_base_patch16_224', ('vit', 'base')),
    ],
)
def test_other_sizes_import_every_key(tmp_path, timm_name, config_args):
  """The larger sizes: every checkpoint key is placed (or dropped by design), shapes match.
  (Numerics are the same code paths as the tiny / W32 comparisons above.)"""
  torch.manual_seed(0)
  model = timm.create_model(timm_name, pretrained=False)
  path = save_safetensors(model, tmp_path / f'{timm_name}.safetensors')
  config = model_config(*config_args, pretrained_image_size=224)
  if config.encoder == 'hrnet':
    config.hrnet_norm = 'frozen_bn'
  params = weights.load_timm_checkpoint(path, config)
  count = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  assert count == sum(np.prod(s) for s in weights.expected_shapes(config).values())
