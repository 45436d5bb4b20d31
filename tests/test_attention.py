"""The hand-written attention VJP against float64 numpy (finite differences) and flax's own."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax.models import attention


def np_attention(q, k, v):
  """float64 loop over batch and heads: softmax(q k^T / sqrt(D)) v. Shapes [B, N, H, D]."""
  out = np.zeros(q.shape, np.float64)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      logits = q[b, :, h] @ k[b, :, h].T / np.sqrt(q.shape[-1])
      weights = np.exp(logits - logits.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      out[b, :, h] = weights @ v[b, :, h]
  return out


def random_qkv(seed, batch, num_q, num_k, heads, width, scale=1.0):
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(size=(batch, n, heads, width)) * scale for n in (num_q, num_k, num_k))


@pytest.mark.parametrize('num_q,num_k', [(7, 7), (9, 4), (3, 11)])
def test_forward_matches_float64_loop(num_q, num_k):
  q, k, v = random_qkv(0, 2, num_q, num_k, 3, 5, scale=2.0)
  got = attention.dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  assert got.shape == q.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_attention(q, k, v), atol=1e-5)


def test_gradients_match_float64_finite_differences():
  q, k, v = random_qkv(1, 2, 3, 4, 2, 3)
  cotangent = np.random.default_rng(2).normal(size=q.shape)
  loss = lambda q, k, v: float(np.sum(np_attention(q, k, v) * cotangent))
  _, vjp = jax.vjp(
      attention.dot_product_attention, *(jnp.asarray(a, jnp.float32) for a in (q, k, v))
  )
  grads = vjp(jnp.asarray(cotangent, jnp.float32))
  inputs = [q, k, v]
  eps = 1e-6
  for arg, grad in enumerate(grads):
    numeric = np.zeros(inputs[arg].shape)
    for index in np.ndindex(inputs[arg].shape):
      plus = [a.copy() for a in inputs]
      minus = [a.copy() for a in inputs]
      plus[arg][index] += eps
      minus[arg][index] -= eps
      numeric[index] = (loss(*plus) - loss(*minus)) / (2 * eps)
    assert np.abs(numeric).max() > 1e-2  # every input moves the loss
    np.testing.assert_allclose(grad, numeric, atol=2e-5, err_msg=f'argument {arg}')


@pytest.mark.parametrize('num_q,num_k', [(194, 194), (48, 16)])
def test_gradients_match_flax_attention_at_decoder_sizes(num_q, num_k):
  q, k, v = (jnp.asarray(a, jnp.float32) for a in random_qkv(3, 2, num_q, num_k, 4, 16, 1.5))
  cotangent = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)
  ours, ours_vjp = jax.vjp(attention.dot_product_attention, q, k, v)
  ref, ref_vjp = jax.vjp(nn.dot_product_attention, q, k, v)
  np.testing.assert_allclose(ours, ref, atol=2e-6)
  for got, want in zip(ours_vjp(cotangent), ref_vjp(cotangent)):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5)


def test_bfloat16_products_float32_softmax():
  q, k, v = random_qkv(5, 2, 6, 8, 2, 8)
  q32, k32, v32 = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
  out = attention.dot_product_attention(q32, k32, v32, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np_attention(q, k, v), atol=5e-2)
  grads = jax.grad(
      lambda *a: jnp.sum(attention.dot_product_attention(*a, dtype=jnp.bfloat16)), argnums=(0, 1, 2)
  )(q32, k32, v32)
  ref = jax.grad(lambda *a: jnp.sum(attention.dot_product_attention(*a)), argnums=(0, 1, 2))(
      q32, k32, v32
  )
  for got, want in zip(grads, ref):
    assert got.dtype == jnp.float32  # gradients come back in the inputs' dtype
    np.testing.assert_allclose(got, want, atol=1e-1)


def test_used_by_flax_multi_head_attention_module():
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 10, 32)), jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(7).normal(size=(2, 5, 32)), jnp.float32)
  make = lambda fn: nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=fn)
  params = make(nn.dot_product_attention).init(jax.random.PRNGKey(0), x, tokens)
  loss = lambda fn: lambda p: jnp.sum(jnp.sin(make(fn).apply(p, x, tokens)))
  ours = jax.grad(loss(attention.dot_product_attention))(params)
  ref = jax.grad(loss(nn.dot_product_attention))(params)
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_rejects_masks_and_mismatched_shapes():
  q = jnp.zeros((2, 3, 4, 8))
  with pytest.raises(ValueError, match='masks'):
    attention.dot_product_attention(q, q, q, mask=jnp.ones((2, 4, 3, 3), bool))
  with pytest.raises(ValueError, match='attention expects'):
    attention.dot_product_attention(q, jnp.zeros((2, 3, 4, 6)), jnp.zeros((2, 3, 4, 6)))
  with pytest.raises(ValueError, match='attention expects'):
    attention.dot_product_attention(q, jnp.zeros((1, 3, 4, 8)), jnp.zeros((1, 3, 4, 8)))
