"""Small building blocks shared by the encoders and the decoder.

Parameters are float32 (`param_dtype`); computation runs in `dtype` (e.g. bfloat16 for mixed
precision). Submodule names follow timm (`fc1`, `fc2`, `qkv`, `proj`) so that importing timm
weights is a mechanical renaming (kernel = weight.T).
"""

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffhand_jax.models import attention

Dtype = Any

# timm initialises Linear weights with a truncated normal of std 0.02 and zero biases.
DENSE_INIT = nn.initializers.truncated_normal(stddev=0.02)


@jax.custom_vjp
def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x @ kernel + bias over the last axis, with a backward pass that XLA CPU runs well.

  Autodiff gives the same three products, but XLA CPU then multiplies the cotangent by the
  kernel in its transposed ("NT") layout, which its matmul library runs ~3x slower than the
  plain layout for the decoder's narrow kernels (K = 64: 16 ms against 4.9 ms for the same
  [24896, 64] x [64, 256] product). Here the kernel's transpose is made once (a [K, N]
  copy, kept apart from the product by an optimisation barrier so that XLA does not fold it
  back into an NT product) and the bias gradient is one reduction over rows. On this 2-core
  CPU the decoder's full-resolution MLP (batch 32, 778 points, 64 -> 256 -> 64) takes 0.85x
  the time forward + backward, the synthetic train step 0.91x (`benchmarks/cpu_kernels.py`,
  BENCHMARKS.md, issue 11).

  Args:
    x: [..., K].
    kernel: [K, N].
    bias: [N].

  Returns:
    [..., N] in the operands' common dtype.
  """
  return _linear_forward(x, kernel, bias)[0]


def _linear_forward(x, kernel, bias):
  if kernel.ndim != 2 or bias.shape != kernel.shape[1:] or x.shape[-1:] != kernel.shape[:1]:
    raise ValueError(
        f'linear: x [..., K], kernel [K, N], bias [N] expected, got {x.shape}, '
        f'{kernel.shape}, {bias.shape}'
    )
  return jnp.dot(x, kernel) + bias, (x, kernel)


def _linear_backward(residuals, d_out):
  x, kernel = residuals
  rows_x = x.reshape(-1, x.shape[-1])
  rows_d = d_out.reshape(-1, d_out.shape[-1])
  kernel_t = jax.lax.optimization_barrier(kernel.T)
  d_x = (rows_d @ kernel_t).reshape(x.shape)
  d_kernel = rows_x.T @ rows_d
  d_bias = jnp.sum(rows_d, axis=0)
  return d_x, d_kernel.astype(kernel.dtype), d_bias.astype(kernel.dtype)


linear.defvjp(_linear_forward, _linear_backward)


class DenseGeneral(nn.Module):
  """flax's DenseGeneral (no batch axes) through `linear`: same parameters, same function.

  Contracts the last `in_axes` axes of x with a kernel [*in_shape, *features] (drawn flat as
  [prod(in_shape), prod(features)] with timm's initialisation and reshaped, as flax does) and
  adds a bias [*features] (zeros). `features=(N,)`, `in_axes=1` is nn.Dense; the attention
  projections use (heads, head_dim) out of the width and back.

  Attributes:
    features: output axes.
    in_axes: how many trailing axes of x are contracted.
    dtype: computation dtype (parameters are float32).
  """

  features: Tuple[int, ...]
  in_axes: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [..., *in_shape]. Returns: [..., *features] in `dtype`."""
    lead, in_shape = x.shape[: x.ndim - self.in_axes], x.shape[x.ndim - self.in_axes :]
    features = tuple(self.features)
    flat = (math.prod(in_shape), math.prod(features))
    kernel = self.param(
        'kernel',
        lambda key, shape, dtype: DENSE_INIT(key, flat, dtype).reshape(shape),
        in_shape + features,
        jnp.float32,
    )
    bias = self.param('bias', nn.initializers.zeros_init(), features, jnp.float32)
    dtype = self.dtype
    out = linear(
        x.reshape(*lead, flat[0]).astype(dtype),
        kernel.reshape(flat).astype(dtype),
        bias.reshape(flat[1]).astype(dtype),
    )
    return out.reshape(*lead, *features)


def dense(features: int, dtype: Dtype, name: str) -> DenseGeneral:
  """nn.Dense's layer (kernel [K, features], bias) with float32 parameters, timm's
  initialisation and computation in `dtype`, through `linear`.

  Call it inside a compact method: the layer is a submodule `name` of the calling module.
  """
  return DenseGeneral((features,), dtype=dtype, name=name)


class MultiHeadAttention(nn.Module):
  """nn.MultiHeadDotProductAttention without mask or dropout, through `DenseGeneral`.

  The same parameters (`query`, `key`, `value` kernels [C, H, D], `out` kernel [H, D, C]) and
  function as flax's module with `attention_fn=attention.dot_product_attention`, so existing
  checkpoints load unchanged; only the projections' backward pass differs (`linear`).

  Attributes:
    num_heads: H; must divide the query width C (D = C / H).
    dtype: computation dtype.
  """

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array) -> jax.Array:
    """Args: inputs_q: [B, Nq, C]; inputs_kv: [B, Nk, Ckv]. Returns: [B, Nq, C]."""
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'attention width {width} is not divisible by num_heads={self.num_heads}')
    heads = (self.num_heads, width // self.num_heads)
    project = lambda name, x: DenseGeneral(heads, dtype=self.dtype, name=name)(x)
    out = attention.dot_product_attention(
        project('query', inputs_q), project('key', inputs_kv), project('value', inputs_kv)
    )
    return DenseGeneral((width,), in_axes=2, dtype=self.dtype, name='out')(out)


def exact_gelu(x: jax.Array) -> jax.Array:
  """GELU with erf, 0.5 x (1 + erf(x / sqrt 2)), as timm / PyTorch `nn.GELU()`.

  flax's default is the tanh approximation; `nn.gelu(approximate=False)` computes the same
  function through erfc, which XLA CPU evaluates ~1.3x slower than erf (BENCHMARKS.md, issue
  11). The two agree to ~1e-6 (absolute).
  """
  return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))


@jax.custom_vjp
def add_to_every_example(x: jax.Array, table: jax.Array) -> jax.Array:
  """x + table broadcast over the batch, with the table's gradient as one matrix product.

  Autodiff would sum the cotangent over the batch axis with a reduction that XLA CPU runs
  ~8x slower than the product ones[1, B] @ cotangent[B, -1] for the decoder's [32, 778, 64]
  position embedding (forward + backward 16.7 ms against 2.0 ms; `benchmarks/cpu_kernels.py`).

  Args:
    x: [B, ...].
    table: x.shape[1:] (e.g. a learned position embedding).

  Returns:
    [B, ...] in x's dtype.
  """
  return _add_forward(x, table)[0]


def _add_forward(x, table):
  if table.shape != x.shape[1:]:
    raise ValueError(f'add_to_every_example: table {table.shape} must be x.shape[1:] of {x.shape}')
  return x + table.astype(x.dtype), table  # the table only for its dtype (kept alive anyway)


def _add_backward(table, cotangent):
  batch = cotangent.shape[0]
  ones = jnp.ones((1, batch), cotangent.dtype)
  d_table = (ones @ cotangent.reshape(batch, -1)).reshape(cotangent.shape[1:])
  return cotangent, d_table.astype(table.dtype)


add_to_every_example.defvjp(_add_forward, _add_backward)


class Mlp(nn.Module):
  """Two dense layers with an exact GELU between them (the transformer MLP).

  Attributes:
    hidden_dim: width of the hidden layer.
    out_dim: output width; None keeps the input width.
    dtype: computation dtype.
  """

  hidden_dim: int
  out_dim: Optional[int] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [..., channels]. Returns: [..., out_dim or channels]."""
    out_dim = x.shape[-1] if self.out_dim is None else self.out_dim
    x = exact_gelu(dense(self.hidden_dim, self.dtype, 'fc1')(x))
    return dense(out_dim, self.dtype, 'fc2')(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (timm's `Attention`).

  A fused `qkv` Dense of width 3*D (ordered q | k | v, heads contiguous inside each) maps
  one-to-one onto timm's `attn.qkv` Linear; `nn.MultiHeadDotProductAttention` would need the
  timm matrix split and reshaped per head. The softmax runs in float32 for bfloat16 stability.

  Attributes:
    num_heads: number of heads; must divide the token width.
    dtype: computation dtype.
  """

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [batch, tokens, width]. Returns: [batch, tokens, width]."""
    batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f'token width {width} is not divisible by num_heads={self.num_heads}')
    head_dim = width // self.num_heads
    qkv = dense(3 * width, self.dtype, 'qkv')(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [batch, tokens, heads, head_dim]
    out = attention.dot_product_attention(q, k, v).reshape(batch, tokens, width)
    return dense(width, self.dtype, 'proj')(out)
