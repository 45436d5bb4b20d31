"""The im2col convolution against a float64 loop, lax.conv (values and gradients) and nn.Conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax.models import conv
from encoder_testing import np_conv

CASES = [  # (height, width, channels, features, kernel, stride): odd sizes, strides, 1x1
    (5, 7, 3, 4, 3, 1),
    (6, 5, 2, 3, 3, 2),
    (2, 2, 8, 8, 3, 1),
    (7, 6, 4, 5, 1, 2),
    (4, 4, 3, 2, 1, 1),
]


@pytest.mark.parametrize('height,width,channels,features,size,stride', CASES)
def test_patches_match_float64_loop_and_lax(height, width, channels, features, size, stride):
  rng = np.random.default_rng(height * 100 + width)
  x = rng.normal(size=(2, height, width, channels))
  kernel = rng.normal(size=(size, size, channels, features))
  pad = size // 2
  want = np_conv(x, kernel, stride)
  x32, k32 = jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
  got = conv.conv2d_patches(x32, k32, stride, pad)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_allclose(conv.conv2d_lax(x32, k32, stride, pad), want, atol=1e-4)
  # Gradients of a non-linear loss: the two forms give the same derivatives.
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k, stride, pad)))
  grads = jax.grad(loss(conv.conv2d_patches), argnums=(0, 1))(x32, k32)
  ref = jax.grad(loss(conv.conv2d_lax), argnums=(0, 1))(x32, k32)
  for got_grad, want_grad in zip(grads, ref):
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-4)


@pytest.mark.parametrize('size,stride', [(3, 1), (3, 2), (1, 2)])
def test_module_has_nn_conv_parameters_and_output(size, stride):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 4)), jnp.float32)
  ours = conv.Conv(5, size, stride)
  theirs = nn.Conv(5, (size, size), strides=stride, padding=size // 2, use_bias=False)
  params = ours.init(jax.random.PRNGKey(3), x)
  ref_params = theirs.init(jax.random.PRNGKey(3), x)
  # Same tree, shapes and initial values: checkpoints and timm imports do not change.
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  np.testing.assert_array_equal(params['params']['kernel'], ref_params['params']['kernel'])
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=1e-5)


def test_module_bfloat16_computation():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 3)), jnp.float32)
  module = conv.Conv(4, 3, 1, dtype=jnp.bfloat16)
  params = module.init(jax.random.PRNGKey(0), x)
  out = module.apply(params, x)
  assert out.dtype == jnp.bfloat16 and params['params']['kernel'].dtype == jnp.float32
  want = np_conv(np.asarray(x), np.asarray(params['params']['kernel']), 1)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=0.1)
