"""layers.linear (hand-written VJP), DenseGeneral and MultiHeadAttention against references.

References: float64 numpy closed forms for the product and its three gradients, and flax's own
nn.Dense / nn.MultiHeadDotProductAttention, whose parameters (names, shapes, initial values) the
modules here must reproduce so that checkpoints and the PyTorch reference's weight copy load
unchanged.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax.models import attention
from diffhand_jax.models import layers


def _normal(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape)


def test_linear_and_its_gradients_match_float64_closed_forms():
  x, kernel, bias = _normal(0, 2, 5, 3), _normal(1, 3, 4), _normal(2, 4)
  d_out = _normal(3, 2, 5, 4)
  out, vjp = jax.vjp(layers.linear, *(jnp.asarray(a, jnp.float32) for a in (x, kernel, bias)))
  d_x, d_kernel, d_bias = vjp(jnp.asarray(d_out, jnp.float32))
  np.testing.assert_allclose(out, np.einsum('bnk,kf->bnf', x, kernel) + bias, atol=1e-5)
  np.testing.assert_allclose(d_x, np.einsum('bnf,kf->bnk', d_out, kernel), atol=1e-5)
  np.testing.assert_allclose(d_kernel, np.einsum('bnk,bnf->kf', x, d_out), atol=1e-5)
  np.testing.assert_allclose(d_bias, d_out.sum(axis=(0, 1)), atol=1e-5)


def test_linear_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='linear: x'):
    layers.linear(jnp.zeros((2, 3)), jnp.zeros((4, 5)), jnp.zeros(5))
  with pytest.raises(ValueError, match='linear: x'):
    layers.linear(jnp.zeros((2, 4)), jnp.zeros((4, 5)), jnp.zeros(4))


def _assert_trees_close(got, want, atol):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5)


def test_dense_is_flax_dense_parameters_values_and_gradients():
  x = jnp.asarray(_normal(4, 2, 7, 6), jnp.float32)
  ours = layers.DenseGeneral((5,))
  ref = nn.Dense(5, kernel_init=layers.DENSE_INIT)
  params = ours.init(jax.random.PRNGKey(0), x)
  _assert_trees_close(params, ref.init(jax.random.PRNGKey(0), x), atol=0)  # same draws
  params = jax.tree.map(lambda p: p + 0.3, params)  # a non-zero bias too
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-6)
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  _assert_trees_close(
      jax.grad(loss(ours), argnums=(0, 1))(params, x),
      jax.grad(loss(ref), argnums=(0, 1))(params, x),
      atol=1e-5,
  )


def test_multi_head_attention_is_flax_module_parameters_values_and_gradients():
  x = jnp.asarray(_normal(5, 2, 10, 32), jnp.float32)
  tokens = jnp.asarray(_normal(6, 2, 5, 32), jnp.float32)
  ours = layers.MultiHeadAttention(num_heads=4)
  ref = nn.MultiHeadDotProductAttention(
      num_heads=4, kernel_init=layers.DENSE_INIT, attention_fn=attention.dot_product_attention
  )
  params = ours.init(jax.random.PRNGKey(1), x, tokens)
  _assert_trees_close(params, ref.init(jax.random.PRNGKey(1), x, tokens), atol=0)
  params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
  np.testing.assert_allclose(ours.apply(params, x, tokens), ref.apply(params, x, tokens), atol=1e-5)
  loss = lambda module: lambda p, x, t: jnp.sum(jnp.sin(module.apply(p, x, t)))
  _assert_trees_close(
      jax.grad(loss(ours), argnums=(0, 1, 2))(params, x, tokens),
      jax.grad(loss(ref), argnums=(0, 1, 2))(params, x, tokens),
      atol=2e-5,
  )
  with pytest.raises(ValueError, match='not divisible'):
    layers.MultiHeadAttention(num_heads=5).init(jax.random.PRNGKey(0), x, tokens)


def test_bfloat16_compute_float32_parameters_and_gradients():
  x = jnp.asarray(_normal(7, 3, 8), jnp.float32)
  module = layers.DenseGeneral((4,), dtype=jnp.bfloat16)
  params = module.init(jax.random.PRNGKey(2), x)
  out = module.apply(params, x)
  assert out.dtype == jnp.bfloat16
  want = nn.Dense(4).apply(params, x)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2)
  grads = jax.grad(lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32) ** 2))(params)
  want_grads = jax.grad(lambda p: jnp.sum(nn.Dense(4).apply(p, x) ** 2))(params)
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, atol=5e-2, rtol=5e-2)
