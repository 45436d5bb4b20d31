"""Depth condition branch (DESIGN §4): 3x3 convolutions from a depth map to a feature grid.

Its output is added to the ViT patch embedding or to the HRNet stem output, so it must end on
that grid: `num_downsamples` stride-2 convolutions reduce H x W by 2**num_downsamples (patch 16:
4; HRNet stem, stride 4: 2).

Initialisation. The paper and DESIGN §4 initialise every kernel and bias to zero
(`zero_init='all'`), so a fresh branch adds exactly zero and the encoder behaves as it did
before the branch existed. Consequence, worth knowing before a fine-tuning run: with every
layer at zero, every hidden activation is act(0) = 0, so the last kernel's gradient (its input
times the upstream gradient) is zero, and every earlier layer's gradient (through the zero
last kernel) is zero too. Only the last bias receives a gradient, so under (stochastic)
gradient descent the branch can only learn a constant offset and never reads the depth map;
and even were it to move, the all-equal weights keep every channel of a layer identical.
`zero_init='last'` (ControlNet's "zero convolution") zeroes only the last layer: the output is
still exactly zero at initialisation, but the last kernel sees non-zero features and learns.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffhand_jax import checks

Dtype = Any

ZERO_INIT_CHOICES = ('all', 'last')


class DepthBranch(nn.Module):
  """Depth map -> feature grid to add to the encoder's first feature map.

  Attributes:
    out_dim: output channels (the ViT width D, or the HRNet stem width).
    num_downsamples: number of stride-2 convolutions (total stride 2**num_downsamples).
    zero_init: 'all' (DESIGN: every kernel and bias zero) or 'last' (only the last layer).
    dtype: computation dtype.
  """

  out_dim: int
  num_downsamples: int
  zero_init: str = 'all'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, depth: jax.Array) -> jax.Array:
    """Args: depth: [batch, H, W, 1]. Returns: [batch, H / 2**n, W / 2**n, out_dim]."""
    if self.zero_init not in ZERO_INIT_CHOICES:
      raise ValueError(f'zero_init={self.zero_init!r}; expected one of {ZERO_INIT_CHOICES}')
    checks.check_array('depth', depth, ('batch', 'H', 'W', 1), finite=False)
    stride = 2**self.num_downsamples
    if depth.shape[1] % stride or depth.shape[2] % stride:
      raise ValueError(f'depth size {depth.shape[1:3]} is not divisible by the stride {stride}')
    # Zero kernels and biases (all layers by default, as DESIGN says): a fresh branch adds
    # exactly 0; with 'all' only the last bias can learn (see the module docstring).
    zeros = nn.initializers.zeros
    # A stride-1 layer first, then the downsampling ones; widths double from 16 (capped at
    # 128), a small ControlNet-like condition encoder; the last layer maps to out_dim.
    strides = [1] + [2] * self.num_downsamples
    x = depth.astype(self.dtype)
    for i, s in enumerate(strides):
      last = i == len(strides) - 1
      width = self.out_dim if last else min(16 * 2**i, 128)
      zero = last or self.zero_init == 'all'
      conv_kwargs = dict(kernel_init=zeros, bias_init=zeros) if zero else {}
      x = nn.Conv(
          width,
          (3, 3),
          strides=(s, s),
          padding=((1, 1), (1, 1)),
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name=f'conv{i}',
          **conv_kwargs,
      )(x)
      if not last:
        x = nn.silu(x)
    return x


def num_downsamples(stride: int) -> int:
  """Number of stride-2 convolutions reaching a total `stride` (a power of two)."""
  k = int(stride).bit_length() - 1
  if stride < 1 or 2**k != stride:
    raise ValueError(f'the depth branch needs a power-of-two stride, got {stride}')
  return k


def check_depth(depth: Optional[jax.Array], image_shape: Sequence[int], use_depth: bool):
  """Raises ValueError when `depth` does not fit the images or the use_depth setting.

  Args:
    depth: [batch, H, W, 1] or None.
    image_shape: shape of the images, [batch, H, W, 3].
    use_depth: whether the encoder has a depth branch.
  """
  if use_depth and depth is None:
    raise ValueError('this encoder has a depth branch (use_depth=True): pass depth [B,H,W,1]')
  if not use_depth and depth is not None:
    raise ValueError('depth was given but the encoder has no depth branch (use_depth=False)')
  if depth is not None:  # shapes only: encoders run traced
    checks.check_array(
        'depth (to match the images)', depth, tuple(image_shape[:3]) + (1,), finite=False
    )
