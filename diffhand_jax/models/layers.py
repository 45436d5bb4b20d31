"""Small building blocks shared by the encoders and the decoder: plain Flax on every backend.

Parameters are float32; computation runs in `dtype` (e.g. bfloat16 for mixed precision).
Submodule names follow timm (`fc1`, `fc2`, `qkv`, `proj`) so that importing timm weights is a
mechanical renaming (kernel = weight.T).

Every block takes `cpu_kernels` (default False: library layers, autodiff and
`jax.nn.dot_product_attention`, which GPUs run as fused kernels). True swaps in the CPU rewrites
of `cpu_kernels.py` and `attention.py` (same parameters, same function and gradients; no
forward-mode autodiff); only CPU configs set it (`config.model.cpu_kernels`).
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffhand_jax.models import attention as cpu_attention
from diffhand_jax.models import cpu_kernels as cpu

Dtype = Any
DENSE_INIT = cpu.DENSE_INIT  # timm: truncated normal, std 0.02; zero biases


def projection(
    features: Tuple[int, ...], in_axes: int, dtype: Dtype, name: str, cpu_kernels: bool = False
) -> nn.Module:
  """A dense layer contracting the last `in_axes` axes into `features` (kernel, bias).

  `nn.DenseGeneral` with float32 parameters and timm's initialisation, or with
  `cpu_kernels` its CPU form (`cpu_kernels.CpuDense`, the same parameters). Call it inside a
  compact method: the layer is a submodule `name` of the caller.
  """
  if cpu_kernels:
    return cpu.CpuDense(tuple(features), in_axes=in_axes, dtype=dtype, name=name)
  return nn.DenseGeneral(
      features=tuple(features),
      axis=tuple(range(-in_axes, 0)),
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=DENSE_INIT,
      name=name,
  )


def dense(features: int, dtype: Dtype, name: str, cpu_kernels: bool = False) -> nn.Module:
  """`nn.Dense`'s layer (kernel [K, features], bias) as `projection` builds it."""
  return projection((features,), 1, dtype, name, cpu_kernels)


def gelu(x: jax.Array, cpu_kernels: bool = False) -> jax.Array:
  """Exact (erf) GELU, as timm / PyTorch `nn.GELU()` (flax's default is the tanh form)."""
  return cpu.erf_gelu(x) if cpu_kernels else nn.gelu(x, approximate=False)


def attend(query: jax.Array, key: jax.Array, value: jax.Array, cpu_kernels: bool = False):
  """softmax(q k^T / sqrt(D)) v per head; the softmax runs in float32.

  Args:
    query: [B, Nq, H, D].
    key: [B, Nk, H, D].
    value: [B, Nk, H, D].
    cpu_kernels: the hand-written backward of `attention.py` instead of
      `jax.nn.dot_product_attention`.

  Returns:
    [B, Nq, H, D] in the query's dtype.
  """
  if cpu_kernels:
    return cpu_attention.dot_product_attention(query, key, value)
  dtype = query.dtype
  return jax.nn.dot_product_attention(query, key.astype(dtype), value.astype(dtype))


class MultiHeadAttention(nn.Module):
  """Multi-head attention without mask or dropout (`nn.MultiHeadDotProductAttention`'s layout).

  Parameters: `query`, `key`, `value` kernels [C, H, D] (biases [H, D]) and `out` [H, D, C],
  as flax's module, so checkpoints of either load into the other.

  Attributes:
    num_heads: H; must divide the query width C (D = C / H).
    dtype: computation dtype.
    cpu_kernels: the CPU rewrites (see the module docstring).
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array) -> jax.Array:
    """Args: inputs_q: [B, Nq, C]; inputs_kv: [B, Nk, Ckv]. Returns: [B, Nq, C]."""
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'attention width {width} is not divisible by num_heads={self.num_heads}')
    heads = (self.num_heads, width // self.num_heads)
    project = lambda name, x: projection(heads, 1, self.dtype, name, self.cpu_kernels)(x)
    out = attend(
        project('query', inputs_q),
        project('key', inputs_kv),
        project('value', inputs_kv),
        self.cpu_kernels,
    )
    return projection((width,), 2, self.dtype, 'out', self.cpu_kernels)(out)


class Mlp(nn.Module):
  """Two dense layers with an exact GELU between them (the transformer MLP).

  Attributes:
    hidden_dim: width of the hidden layer.
    out_dim: output width; None keeps the input width.
    dtype: computation dtype.
    cpu_kernels: the CPU rewrites (see the module docstring).
  """

  hidden_dim: int
  out_dim: Optional[int] = None
  dtype: Dtype = jnp.float32
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [..., channels]. Returns: [..., out_dim or channels]."""
    out_dim = x.shape[-1] if self.out_dim is None else self.out_dim
    x = dense(self.hidden_dim, self.dtype, 'fc1', self.cpu_kernels)(x)
    x = gelu(x, self.cpu_kernels)
    return dense(out_dim, self.dtype, 'fc2', self.cpu_kernels)(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (timm's `Attention`).

  A fused `qkv` Dense of width 3*D (ordered q | k | v, heads contiguous inside each) maps
  one-to-one onto timm's `attn.qkv` Linear; `nn.MultiHeadDotProductAttention` would need the
  timm matrix split and reshaped per head.

  Attributes:
    num_heads: number of heads; must divide the token width.
    dtype: computation dtype.
    cpu_kernels: the CPU rewrites (see the module docstring).
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [batch, tokens, width]. Returns: [batch, tokens, width]."""
    batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f'token width {width} is not divisible by num_heads={self.num_heads}')
    head_dim = width // self.num_heads
    qkv = dense(3 * width, self.dtype, 'qkv', self.cpu_kernels)(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [batch, tokens, heads, head_dim]
    out = attend(q, k, v, self.cpu_kernels).reshape(batch, tokens, width)
    return dense(width, self.dtype, 'proj', self.cpu_kernels)(out)
