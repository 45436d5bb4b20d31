"""2-D convolution without bias, computed on a CPU as one matrix product (im2col).

XLA CPU runs `lax.conv_general_dilated` through a generic kernel that is slow on the small maps of a
64 px ResNet: forward + backward of a 3x3, 256 -> 256 convolution on a batch of 32 2x2 maps took
68.7 ms on this 2-core CPU where the same work as patches x kernel took 2.7 ms; stride 2, 4x4 ->
2x2, 128 -> 256: 25.7 ms against 3.1 ms; the 64 px stem: 9.4 against 5.9 ms
(`benchmarks/cpu_kernels.py`, BENCHMARKS.md). On a CPU `Conv` therefore gathers the k x k shifted
windows of the padded input into a [B, Ho, Wo, k*k*C] array and multiplies it by the kernel reshaped
to [k*k*C, F]; elsewhere (cuDNN on a GPU) it calls `lax.conv_general_dilated`. Both give the same
convolution (to float rounding), and the parameter is `nn.Conv`'s: one 'kernel' of shape [k, k, C,
F] with the same initialiser, so checkpoints and timm imports are unchanged.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def conv2d_patches(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """Convolution (cross-correlation, as lax.conv) as im2col + one matrix product.

  Args:
    x: [B, H, W, C].
    kernel: [k, k, C, F].
    stride: the same in both directions.
    padding: zeros on every side.

  Returns:
    [B, Ho, Wo, F] with Ho = (H + 2 * padding - k) // stride + 1 (Wo alike).
  """
  batch, height, width, channels = x.shape
  size, _, _, features = kernel.shape
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out_h = (height + 2 * padding - size) // stride + 1
  out_w = (width + 2 * padding - size) // stride + 1
  windows = [
      x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
      for i in range(size)
      for j in range(size)
  ]  # (i, j) row-major with channels innermost: the order of kernel.reshape(k * k * C, F)
  patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
  out = patches.reshape(-1, size * size * channels) @ kernel.reshape(-1, features)
  return out.reshape(batch, out_h, out_w, features)


def conv2d_lax(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """The same convolution through `lax.conv_general_dilated` (NHWC, HWIO)."""
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      ((padding, padding), (padding, padding)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


class Conv(nn.Module):
  """Square k x k convolution without bias, padding k // 2 on every side (as `nn.Conv`).

  Attributes:
    features: output channels F.
    kernel_size: k.
    stride: stride in both directions.
    dtype: computation dtype (the kernel parameter is float32).
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [B, H, W, C]. Returns: [B, ceil(H / stride), ceil(W / stride), F]."""
    kernel = self.param(
        'kernel',
        nn.initializers.lecun_normal(),
        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
        jnp.float32,
    )
    conv = conv2d_patches if jax.default_backend() == 'cpu' else conv2d_lax
    return conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.kernel_size // 2)
