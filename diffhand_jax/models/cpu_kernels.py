"""CPU-only forms of the dense layer and the GELU, behind `config.model.cpu_kernels`.

The model's standard path is plain Flax/JAX (`layers.py`: `nn.Dense`, `nn.DenseGeneral`,
`jax.nn.dot_product_attention`, `nn.gelu`), which every transformation (jvp, vmap, hessian) and
every backend handles. On XLA CPU a few of its pieces run slowly, and this module holds their
rewrites; `layers.py` picks them only when a module is built with `cpu_kernels=True`, which only
the CPU configs (`configs/synthetic.py`) turn on. Each rewrite computes the same function with the
same parameters (checkpoints are interchangeable) and the same gradients (tests/test_layers.py);
`linear` and the attention (`attention.py`) have a custom VJP, so forward-mode autodiff (`jax.jvp`,
`jax.jacfwd`, `jax.hessian`) is not available through a model built with the switch on.

What each still earns on the 2-core CPU (benchmarks/cpu_kernels.py, BENCHMARKS.md):
  linear      the transposed-kernel product of autodiff runs ~3x slower in XLA CPU's matmul
              library for the decoder's narrow kernels; here the kernel's transpose is made
              once (kept apart by an optimisation barrier) and the bias gradient is one
              reduction over rows.
  erf_gelu    XLA CPU evaluates `nn.gelu(approximate=False)` (through erfc) ~1.3x slower than
              the same function through erf.
"""

import math
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# timm initialises Linear weights with a truncated normal of std 0.02 and zero biases.
DENSE_INIT = nn.initializers.truncated_normal(stddev=0.02)


@jax.custom_vjp
def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x @ kernel + bias over the last axis, with a backward pass that XLA CPU runs well.

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


class CpuDense(nn.Module):
  """`nn.DenseGeneral` over the trailing `in_axes` axes, computed through `linear`.

  The parameters are the library layer's (kernel [*in_shape, *features] drawn flat as
  [prod(in_shape), prod(features)] and reshaped, as flax does; bias [*features], zeros), so
  `nn.Dense` / `nn.DenseGeneral` and this module load each other's checkpoints.

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


def erf_gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)): `nn.gelu(x, approximate=False)` through erf.

  The two agree to ~1e-6 (absolute); both are plain JAX, so this one needs no custom rule.
  """
  return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))
