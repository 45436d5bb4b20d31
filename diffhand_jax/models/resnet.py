"""A small GroupNorm ResNet encoder for training from scratch on a CPU (DESIGN §4).

A ViT trained from scratch on a few thousand images learns too slowly to be the CPU default;
a residual CNN has the locality prior built in. Layout (input side S):

  stem    3x3 conv, stride 2                          S/2
  stage 1 basic blocks, the first with stride 2       S/4
  stage 2 ...                                         S/8
  stage 3 ...                                         S/16  -> tokens F
  stage 4 ...                                         S/32  -> embedding e

Tokens F: a 1x1 projection of the stage-3 map to D plus a learned position embedding (the
decoder's cross-attention is blind to token order, and a CNN map carries no position
otherwise). Embedding e: a learned linear pooling of the whole stage-4 map (flattened, then
Dense to D). Global average pooling, the usual choice, throws away where things are in the
image, which is what the hand's orientation is read from; measured here, the linear pooling
learns it several times faster (BENCHMARKS.md). D = the stage-4 width, so tokens and
embedding share one width as the decoder expects; the pooling ties the module to the input
size it was initialised with.
GroupNorm (no batch statistics) keeps the module pure, and per-example results independent of
the batch, like the rest of the model.

Space-to-depth input (`space_to_depth` = f > 1): the image of side f·S is first folded into
[S, S, 3·f²] (each f x f block of pixels becomes one pixel's channels), and the network behind
it is the one above at side S. A model trained at side S can so be carried to f times the
resolution without changing any layer but the stem's kernel: `stem_kernel_for_space_to_depth`
spreads it over the f² sub-pixels, so that at the start the network computes exactly what it
computed on the f x f block means (the area-downsampled image).
"""

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffhand_jax.models import depth as depth_lib
from diffhand_jax.models.hrnet import ConvNorm

Dtype = Any

TOKEN_STRIDE = 16
STEM_STRIDE = 2


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  """widths: channels of stages 1-4; blocks: basic blocks per stage; stem: stem channels."""

  widths: Tuple[int, int, int, int]
  blocks: Tuple[int, int, int, int]
  stem: int


RESNET_SIZES = {
    'micro': ResNetSpec(widths=(8, 16, 32, 64), blocks=(1, 1, 1, 1), stem=8),  # tests only
    'tiny': ResNetSpec(widths=(32, 64, 128, 256), blocks=(1, 1, 1, 1), stem=24),
    'small': ResNetSpec(widths=(32, 64, 128, 256), blocks=(2, 2, 2, 2), stem=32),
    'base': ResNetSpec(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), stem=32),
}


def space_to_depth(images: jax.Array, factor: int) -> jax.Array:
  """Folds factor x factor pixel blocks into channels.

  Args:
    images: [batch, H, W, C], H and W multiples of `factor`.
    factor: block side f.
  Returns:
    [batch, H/f, W/f, f*f*C]; channel (dy*f + dx)*C + c holds images[:, f*i + dy, f*j + dx, c].
  """
  batch, height, width, channels = images.shape
  blocks = images.reshape(batch, height // factor, factor, width // factor, factor, channels)
  return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(
      batch, height // factor, width // factor, factor * factor * channels
  )


def stem_kernel_for_space_to_depth(kernel: jax.Array, factor: int) -> jax.Array:
  """The stem kernel [k, k, C, O] of a model trained on images of side S, carried to inputs
  folded by `space_to_depth(., factor)` from side f·S: [k, k, f*f*C, O], each sub-pixel's
  copy divided by f², so conv(space_to_depth(x)) = conv(block means of x)."""
  if kernel.ndim != 4:
    raise ValueError(f'stem kernel must be [k, k, C, O], got shape {kernel.shape}')
  return jnp.tile(kernel, (1, 1, factor * factor, 1)) / (factor * factor)


class ResidualBlock(nn.Module):
  """Two 3x3 ConvNorms with a residual; the first conv (and a 1x1 shortcut) may stride."""

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [batch, H, W, C]. Returns: [batch, H/stride, W/stride, features]."""
    y = ConvNorm(self.features, 3, self.stride, dtype=self.dtype, name='conv1')(x)
    y = ConvNorm(self.features, 3, relu=False, dtype=self.dtype, name='conv2')(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = ConvNorm(self.features, 1, self.stride, relu=False, dtype=self.dtype, name='shortcut')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """GroupNorm ResNet: images -> (stride-16 tokens, pooled stride-32 embedding).

  Attributes:
    spec: a `ResNetSpec` (RESNET_SIZES).
    use_depth: add a depth branch (depth.DepthBranch) to the stem output.
    depth_zero_init: see `depth.DepthBranch.zero_init`.
    space_to_depth: f; images of side f·S enter as `space_to_depth(images, f)` (module docstring).
    dtype: computation dtype (parameters stay float32).
  """

  spec: ResNetSpec
  use_depth: bool = False
  depth_zero_init: str = 'last'
  space_to_depth: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, images: jax.Array, depth: Optional[jax.Array] = None
  ) -> Tuple[jax.Array, jax.Array]:
    """Encodes images.

    Args:
      images: [batch, S, S, 3], S a multiple of 32·f (f = space_to_depth).
      depth: [batch, S, S, 1]; required when use_depth, rejected otherwise.

    Returns:
      tokens: [batch, (S/(16·f))^2, D]; embedding: [batch, D]; D = spec.widths[3].
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [batch, H, W, 3], got shape {images.shape}')
    multiple = 32 * self.space_to_depth
    if images.shape[1] % multiple or images.shape[2] % multiple:
      raise ValueError(
          f'image size {images.shape[1:3]} is not a multiple of {multiple} (resnet with '
          f'space_to_depth={self.space_to_depth})'
      )
    if self.use_depth and self.space_to_depth != 1:
      raise ValueError('the resnet depth branch needs space_to_depth=1')
    depth_lib.check_depth(depth, images.shape, self.use_depth)
    x = images.astype(self.dtype)
    if self.space_to_depth != 1:
      x = space_to_depth(x, self.space_to_depth)
    x = ConvNorm(self.spec.stem, 3, STEM_STRIDE, dtype=self.dtype, name='stem')(x)
    if self.use_depth:
      x = x + depth_lib.DepthBranch(
          self.spec.stem,
          depth_lib.num_downsamples(STEM_STRIDE),
          zero_init=self.depth_zero_init,
          dtype=self.dtype,
          name='depth',
      )(depth)
    token_map = None
    for stage, (width, count) in enumerate(zip(self.spec.widths, self.spec.blocks), start=1):
      for block in range(count):
        x = ResidualBlock(
            width, 2 if block == 0 else 1, dtype=self.dtype, name=f'stage{stage}_block{block}'
        )(x)
      if stage == 3:
        token_map = x
    out_dim = self.spec.widths[3]
    tokens = nn.Conv(out_dim, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name='token_proj')(
        token_map
    )
    batch, height, width, _ = tokens.shape
    position = self.param(
        'token_pos_embed', nn.initializers.normal(0.02), (height * width, out_dim), jnp.float32
    )
    tokens = tokens.reshape(batch, height * width, out_dim) + position.astype(tokens.dtype)
    embedding = nn.Dense(out_dim, dtype=self.dtype, param_dtype=jnp.float32, name='embed_pool')(
        x.reshape(batch, -1)
    )
    return tokens, embedding
