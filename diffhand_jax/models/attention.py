"""Multi-head dot-product attention with a hand-written backward pass: a CPU rewrite.

Used only by models built with `cpu_kernels=True` (layers.attend; configs/synthetic.py); the
plain path, and every accelerator config, runs `jax.nn.dot_product_attention` (fused kernels on
GPUs). Same result as `jax.nn.dot_product_attention` without mask or dropout (query scaled by
1/sqrt(head width), softmax over keys in float32), but faster to differentiate on a CPU.
Automatic differentiation of the einsum form leaves XLA CPU with a full [B, H, Nq, Nk] buffer of
the scale constant, another of the broadcast softmax denominator, a softmax backward over
[B, H, Nq, Nk] and batched products whose operands sit in the [B, N, H, D] layout, which XLA
CPU runs through a slow generic path. Here the heads are moved in front once, the backward
uses the softmax identity rowsum(dP * P) = rowsum(dO * O) (a [B, H, Nq] vector from the
outputs instead of a reduction over the weights), and the scale is folded into the query.
On this 2-core CPU, forward + backward of the decoder's self-attention (batch 32, 4 heads of
16, 194 points) took 38.5 ms against 74.6 ms (`benchmarks/cpu_kernels.py`, BENCHMARKS.md).

The backward keeps the attention weights P from the forward pass ([B, H, Nq, Nk] float32, as
autodiff of the einsum form does): no recomputation.
"""

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

Dtype = Any

# [B, N, H, D] <-> [B, H, N, D]; the permutation is its own inverse.
_HEADS_FIRST = (0, 2, 1, 3)


def _heads_first(x: jax.Array) -> jax.Array:
  return jnp.transpose(x, _HEADS_FIRST)


def _forward(
    query: jax.Array, key: jax.Array, value: jax.Array
) -> Tuple[jax.Array, Tuple[jax.Array, ...]]:
  """Attention output [B, Nq, H, D] and the residuals of the backward pass."""
  dtype = query.dtype
  q = _heads_first(query) * jnp.asarray(query.shape[-1] ** -0.5, dtype)
  k, v = _heads_first(key), _heads_first(value)
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bhqk,bhkd->bhqd', weights.astype(dtype), v)
  return _heads_first(out), (q, k, v, weights, out)


def _backward(residuals: Tuple[jax.Array, ...], d_out: jax.Array) -> Tuple[jax.Array, ...]:
  """Gradients (d_query, d_key, d_value), each in its input's [B, N, H, D] layout and dtype."""
  q, k, v, weights, out = residuals
  dtype = q.dtype
  d_out = _heads_first(d_out).astype(dtype)
  d_value = jnp.einsum('bhqk,bhqd->bhkd', weights.astype(dtype), d_out)
  d_weights = jnp.einsum('bhqd,bhkd->bhqk', d_out, v).astype(jnp.float32)
  # Softmax backward: dL/dlogits = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O).
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = (weights * (d_weights - row)).astype(dtype)
  scale = jnp.asarray(q.shape[-1] ** -0.5, dtype)
  d_query = jnp.einsum('bhqk,bhkd->bhqd', d_logits, k) * scale
  d_key = jnp.einsum('bhqk,bhqd->bhkd', d_logits, q)  # q carries the scale already
  return _heads_first(d_query), _heads_first(d_key), _heads_first(d_value)


@jax.custom_vjp
def _attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  return _forward(query, key, value)[0]


_attention.defvjp(_forward, _backward)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: Optional[jax.Array] = None,
    dtype: Optional[Dtype] = None,
) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per head, for `nn.MultiHeadDotProductAttention(attention_fn=...)`.

  Args:
    query: [B, Nq, H, D].
    key: [B, Nk, H, D].
    value: [B, Nk, H, D].
    mask: not supported (must be None; the decoder and encoders attend to every token).
    dtype: computation dtype of the products (None: the query's); the softmax runs in float32.

  Returns:
    [B, Nq, H, D] in `dtype`.
  """
  if mask is not None:
    raise ValueError('dot_product_attention: masks are not supported')
  if (
      query.ndim != 4
      or key.shape != value.shape
      or (query.shape[0], *query.shape[2:]) != (key.shape[0], *key.shape[2:])
  ):
    raise ValueError(
        'attention expects query [B, Nq, H, D] and key = value [B, Nk, H, D], got '
        f'{query.shape}, {key.shape}, {value.shape}'
    )
  dtype = query.dtype if dtype is None else dtype
  return _attention(query.astype(dtype), key.astype(dtype), value.astype(dtype))
