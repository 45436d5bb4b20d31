"""Tests of the HRNet encoder and of the zero-initialised depth branch."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax.models import depth as depth_lib
from diffhand_jax.models import encoder
from diffhand_jax.models import hrnet
from encoder_testing import abstract_encoder_outputs
from encoder_testing import np_conv
from encoder_testing import model_config
from encoder_testing import perturbed
from encoder_testing import random_array
from encoder_testing import random_variables

# HRNet paper (Sun et al. 2019, COCO pose table): HRNet-W32 28.5 M, HRNet-W48 63.6 M parameters;
# those include a final 1x1 convolution to 17 heatmaps (under 1 k parameters).
PUBLISHED_HRNET_PARAMS = {'w32': 28.5e6, 'w48': 63.6e6}


# ---- Numpy reference (float64) ----


def np_group_norm(x, p, groups, eps=1e-5):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * p['scale'] + p['bias']


def np_conv_norm(x, p, stride=1, relu=True):
  kernel = np.asarray(p['conv']['kernel'], np.float64)
  y = np_conv(x, kernel, stride)
  y = np_group_norm(y, jax.tree.map(np.asarray, p['norm']), math.gcd(32, kernel.shape[-1]))
  return np.maximum(y, 0) if relu else y


def np_hr_module(xs, p, num_outputs):
  """Branches of one basic block each, then fusion (nearest upsampling by index arithmetic)."""
  ys = []
  for b, x in enumerate(xs):
    blk = p[f'branch{b}_block0']
    ys.append(
        np.maximum(x + np_conv_norm(np_conv_norm(x, blk['conv1']), blk['conv2'], relu=False), 0)
    )
  outs = []
  for i in range(num_outputs):
    total = ys[i].copy()
    for j in range(len(ys)):
      if j > i:
        y = np_conv_norm(ys[j], p[f'fuse{i}_{j}'], relu=False)
        f = 2 ** (j - i)
        rows = np.arange(total.shape[1]) // f
        cols = np.arange(total.shape[2]) // f
        total += y[:, rows][:, :, cols]
      elif j < i:
        y = ys[j]
        for k in range(i - j):
          y = np_conv_norm(y, p[f'fuse{i}_{j}_{k}'], stride=2, relu=k < i - j - 1)
        total += y
    outs.append(np.maximum(total, 0))
  return outs


# ---- HRNet ----


def test_conv_norm_matches_reference():
  x = random_array(0, (2, 8, 8, 6))
  for kernel, stride, features in [(3, 1, 64), (3, 2, 12), (1, 1, 8)]:
    module = hrnet.ConvNorm(features, kernel, stride)
    variables = random_variables(module, x, seed=kernel + stride)
    ref = np_conv_norm(np.asarray(x, np.float64), variables['params'], stride)
    np.testing.assert_allclose(module.apply(variables, x), ref, atol=1e-4)


def test_hr_module_fusion_matches_reference():
  widths = (4, 8, 16)
  xs = [random_array(b, (2, 16 // 2**b, 16 // 2**b, w)) for b, w in enumerate(widths)]
  for num_outputs in (3, 1):
    module = hrnet.HRModule(widths, num_blocks=1, num_outputs=num_outputs)
    variables = random_variables(module, xs, seed=num_outputs)
    outs = jax.jit(module.apply)(variables, xs)
    refs = np_hr_module([np.asarray(x, np.float64) for x in xs], variables['params'], num_outputs)
    assert len(outs) == num_outputs
    for out, ref in zip(outs, refs):
      np.testing.assert_allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize('size,image_size', [('w8', 32), ('w8', 64), ('w32', 64)])
def test_hrnet_shapes(size, image_size):
  config = model_config('hrnet', size)
  variables, tokens, embedding = abstract_encoder_outputs(config, image_size)
  width = encoder.encoder_width(config)
  assert width == hrnet.HRNET_SIZES[size].widths[0]
  assert tokens.shape == (2, encoder.num_tokens(config, image_size), width)
  assert encoder.num_tokens(config, image_size) == (image_size // 4) ** 2
  assert embedding.shape == (2, width)


def test_hrnet_tokens_are_high_resolution_branch_and_embedding_its_mean():
  module = encoder.build_encoder(model_config('hrnet', 'w8'))
  images = random_array(0, (2, 32, 32, 3))
  variables = random_variables(module, images)

  @jax.jit
  def run(variables, images):
    return module.apply(variables, images, capture_intermediates=True)

  (tokens, embedding), state = run(variables, images)
  chex.assert_tree_all_finite((tokens, embedding))
  # The last stage's final module returns the fused high-resolution branch only.
  (high,) = state['intermediates']['stage4_module0']['__call__'][0]
  chex.assert_shape(high, (2, 8, 8, 8))
  np.testing.assert_allclose(tokens, np.asarray(high).reshape(2, 64, 8), atol=1e-6)
  np.testing.assert_allclose(embedding, np.asarray(high).mean(axis=(1, 2)), atol=1e-5)
  assert float(jnp.std(tokens)) > 1e-3  # not a degenerate constant map


def test_hrnet_rejects_bad_images():
  module = encoder.build_encoder(model_config('hrnet', 'w8'))
  with pytest.raises(ValueError, match='multiple of 32'):
    jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)))
  with pytest.raises(ValueError, match=r'\[batch, H, W, 3\]'):
    jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32)))


def closed_form_hrnet_params(spec):
  """Parameter count written from the architecture description (conv kernels + norm affine)."""
  conv_norm = lambda k, cin, cout: k * k * cin * cout + 2 * cout
  total = conv_norm(3, 3, spec.stem_width) + conv_norm(3, spec.stem_width, spec.stem_width)
  cin, planes = spec.stem_width, spec.stage1_planes
  for _ in range(spec.stage1_blocks):
    total += conv_norm(1, cin, planes) + conv_norm(3, planes, planes)
    total += conv_norm(1, planes, 4 * planes)
    total += conv_norm(1, cin, 4 * planes) if cin != 4 * planes else 0
    cin = 4 * planes
  previous = [cin]
  for stage, num_modules in enumerate(spec.num_modules):
    widths = spec.widths[: stage + 2]
    total += sum(conv_norm(3, c, w) for c, w in zip(previous, widths) if c != w)
    total += conv_norm(3, previous[-1], widths[-1])  # the new, coarser branch
    for m in range(num_modules):
      final = stage == len(spec.num_modules) - 1 and m == num_modules - 1
      total += sum(spec.num_blocks * 2 * conv_norm(3, w, w) for w in widths)
      for i in range(1 if final else len(widths)):
        for j, w in enumerate(widths):
          if j > i:
            total += conv_norm(1, w, widths[i])
          elif j < i:
            total += (i - j - 1) * conv_norm(3, w, w) + conv_norm(3, w, widths[i])
    previous = list(widths)
  return total


@pytest.mark.parametrize('size', ['w8', 'w32', 'w48', 'w64'])
def test_hrnet_parameter_counts(size):
  module = encoder.build_encoder(model_config('hrnet', size))
  shapes = jax.eval_shape(
      module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  )
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert count == closed_form_hrnet_params(hrnet.HRNET_SIZES[size])
  if size in PUBLISHED_HRNET_PARAMS:  # published values are rounded to 0.1 M
    assert abs(count - PUBLISHED_HRNET_PARAMS[size]) < 0.05e6


# ---- Depth branch ----


def fresh_depth_params(module, config, images, depth, seed):
  """Initial parameters of the encoder's depth branch, from the branch's own init.

  Initialising the branch alone avoids compiling the whole encoder's init (tens of seconds
  for HRNet); the shape check ties it to the subtree that the encoder itself creates.
  """
  stride = hrnet.STEM_STRIDE if config.encoder == 'hrnet' else config.patch_size
  out_dim = (
      hrnet.HRNET_SIZES[config.encoder_size].stem_width
      if config.encoder == 'hrnet'
      else encoder.encoder_width(config)
  )
  branch = depth_lib.DepthBranch(
      out_dim, depth_lib.num_downsamples(stride), zero_init=config.depth_zero_init
  )
  params = branch.init(jax.random.PRNGKey(seed), depth)['params']
  encoder_shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), images, depth)
  chex.assert_trees_all_equal_shapes(params, encoder_shapes['params']['depth'])
  return params


@pytest.mark.parametrize('encoder_name,size', [('vit', 'micro'), ('hrnet', 'w8')])
@pytest.mark.parametrize('zero_init', ['all', 'last'])
def test_fresh_depth_branch_leaves_encoder_unchanged(encoder_name, size, zero_init):
  config = model_config(encoder_name, size, use_depth=True, depth_zero_init=zero_init)
  module = encoder.build_encoder(config)
  plain = encoder.build_encoder(model_config(encoder_name, size))
  images = random_array(2, (2, 32, 32, 3))
  depth = random_array(3, (2, 32, 32, 1), scale=0.05)
  depth_params = fresh_depth_params(module, config, images, depth, seed=1)
  base = random_variables(plain, images)['params']
  with_depth = jax.jit(module.apply)
  expected = jax.jit(plain.apply)({'params': base}, images)
  got = with_depth({'params': {**base, 'depth': depth_params}}, images, depth)
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a, b)
  got = with_depth({'params': {**base, 'depth': perturbed(depth_params, 4)}}, images, depth)
  assert float(jnp.abs(got[0] - expected[0]).max()) > 1e-3


def test_encoder_init_creates_zero_depth_branch():
  config = model_config('vit', 'micro', use_depth=True)
  module = encoder.build_encoder(config)
  images, depth = jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 32, 32, 1))
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images, depth)['params']
  assert len(params['depth']) == 1 + depth_lib.num_downsamples(16)
  assert all(bool(jnp.all(a == 0)) for a in jax.tree.leaves(params['depth']))
  assert float(jnp.abs(params['patch_embed']['kernel']).max()) > 0  # the rest is random


@pytest.mark.parametrize('zero_init', ['all', 'last'])
def test_depth_branch_init_and_gradient_flow(zero_init):
  # Documents the consequence of the all-zero initialisation (depth.py docstring): only the
  # last bias gets a gradient; with zero_init='last' the last kernel learns as well.
  branch = depth_lib.DepthBranch(out_dim=8, num_downsamples=2, zero_init=zero_init)
  depth = random_array(0, (2, 16, 16, 1))
  params = branch.init(jax.random.PRNGKey(1), depth)['params']
  last = f'conv{len(params) - 1}'
  assert sorted(params) == ['conv0', 'conv1', 'conv2']
  out = branch.apply({'params': params}, depth)
  chex.assert_shape(out, (2, 4, 4, 8))
  np.testing.assert_array_equal(out, 0.0)
  for name, layer in params.items():
    if name == last or zero_init == 'all':
      assert all(bool(jnp.all(a == 0)) for a in jax.tree.leaves(layer)), name
    else:  # default (random) kernels; biases start at zero as usual
      assert float(jnp.abs(layer['kernel']).min()) > 0, name
  target = random_array(2, out.shape)
  grads = jax.grad(lambda p: jnp.sum((branch.apply({'params': p}, depth) - target) ** 2))(params)
  moving = {
      f'{n}/{k}'
      for n, layer in grads.items()
      for k, g in layer.items()
      if float(jnp.abs(g).max()) > 0
  }
  if zero_init == 'all':
    assert moving == {f'{last}/bias'}
  else:
    assert {f'{last}/bias', f'{last}/kernel'} <= moving


def test_depth_arguments_are_checked():
  images = jnp.zeros((1, 32, 32, 3))
  depth = jnp.zeros((1, 32, 32, 1))
  with_depth = encoder.build_encoder(model_config('vit', 'micro', use_depth=True))
  plain = encoder.build_encoder(model_config('vit', 'micro'))
  init = lambda m, *a: jax.eval_shape(m.init, jax.random.PRNGKey(0), *a)
  with pytest.raises(ValueError, match='pass depth'):
    init(with_depth, images)
  with pytest.raises(ValueError, match='no depth branch'):
    init(plain, images, depth)
  with pytest.raises(ValueError, match='to match the images'):
    init(with_depth, images, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='zero_init'):
    init(
        encoder.build_encoder(
            model_config('vit', 'micro', use_depth=True, depth_zero_init='first')
        ),
        images,
        depth,
    )
  with pytest.raises(ValueError, match='power-of-two'):
    depth_lib.num_downsamples(12)
