"""Small building blocks shared by the encoders and the decoder.

Parameters are float32 (`param_dtype`); computation runs in `dtype` (e.g. bfloat16 for mixed
precision). Submodule names follow timm (`fc1`, `fc2`, `qkv`, `proj`) so that importing timm
weights is a mechanical renaming (kernel = weight.T).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffhand_jax.models import attention

Dtype = Any

# timm initialises Linear weights with a truncated normal of std 0.02 and zero biases.
DENSE_INIT = nn.initializers.truncated_normal(stddev=0.02)


def dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  """nn.Dense with float32 parameters, timm's initialisation and computation in `dtype`.

  Call it inside a compact method: the layer is a submodule `name` of the calling module.
  """
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=DENSE_INIT, name=name)


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
