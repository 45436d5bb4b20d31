"""HRNet image encoder (Flax linen), the layout of timm's `hrnet_w{32,48,64}` backbone.

Stem (two stride-2 3x3 convolutions, 64 channels) -> stage 1 (bottlenecks) -> stages 2-4 with
2 / 3 / 4 parallel branches of basic blocks at strides 4, 8, 16, 32 and multi-resolution fusion
after every module. As in the HRNet pose / mesh networks, the last module of stage 4 fuses into
the highest-resolution branch only; that branch (stride 4, width widths[0]) flattened is the
token map F, and its global average is the embedding e (width D = widths[0]).

Normalisation, `norm` (config.model.hrnet_norm):
- 'group' (default, training from scratch): GroupNorm instead of timm's BatchNorm.
  BatchNorm's running statistics are a mutable collection that the pure
  `(params, batch, rng) -> loss` training step would have to thread through (and frozen
  statistics would not suit training from scratch); GroupNorm has no state and is batch-size
  independent. Groups = gcd(32, channels): 32 for multiples of 32, 16 for W48's 48-channel
  branch, fewer for the tiny test size. timm's BatchNorm weights cannot be converted to it.
- 'frozen_bn' (ImageNet-pretrained timm weights, weights.py): each norm is a per-channel
  affine map y = scale * x + bias into which the import folds BatchNorm's running statistics
  (scale = gamma / sqrt(var + eps), bias = beta - mean * scale): exactly timm in eval mode.
  Why frozen and folded rather than a live BatchNorm: (1) the training step stays a pure
  function of params (no `batch_stats` collection to thread through jit/pmap and the
  checkpoints); (2) the paper's batch is 64 over 4 accelerators, 16 crops per device, too few
  for reliable batch statistics, and fine-tuning with re-estimated statistics on hand crops
  would drift from the ImageNet ones the pretrained convolutions expect (detection backbones
  freeze BatchNorm for the same reason); (3) scale and bias stay trainable parameters (no
  weight decay: they are 1-D), so fine-tuning can still adjust each channel. The submodule is
  named `bn` (GroupNorm's is `norm`), so the two forms' parameter trees differ and a checkpoint
  of one cannot be loaded into the other by mistake.

Submodule names echo timm's (timm name -> ours): conv1+bn1 -> conv1, conv2+bn2 -> conv2,
layer1.{n} -> layer1_block{n}, transition{k}.{b} -> transition{k}_{b},
stage{k}.{m}.branches.{b}.{n} -> stage{k}_module{m}/branch{b}_block{n},
stage{k}.{m}.fuse_layers.{i}.{j} -> .../fuse{i}_{j} (coarser j) or fuse{i}_{j}_{k} (finer j).
"""

import dataclasses
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffhand_jax import checks
from diffhand_jax.models import conv
from diffhand_jax.models import depth as depth_lib

Dtype = Any

STEM_STRIDE = 4  # the stem's two stride-2 convolutions: the high-resolution branch stride
BOTTLENECK_EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class HRNetSpec:
  """Architecture of one HRNet size.

  Attributes:
    stem_width: channels of the two stem convolutions.
    stage1_planes: bottleneck inner width of stage 1 (output = 4x).
    stage1_blocks: bottlenecks in stage 1.
    widths: branch widths at strides 4, 8, 16, 32.
    num_modules: HR modules in stages 2, 3, 4.
    num_blocks: basic blocks per branch in every HR module.
  """

  stem_width: int = 64
  stage1_planes: int = 64
  stage1_blocks: int = 4
  widths: Tuple[int, int, int, int] = (32, 64, 128, 256)
  num_modules: Tuple[int, int, int] = (1, 4, 3)
  num_blocks: int = 4


NORMS = ('group', 'frozen_bn')

HRNET_SIZES = {
    'w8': HRNetSpec(
        stem_width=16,
        stage1_planes=8,
        stage1_blocks=1,
        widths=(8, 16, 32, 64),
        num_modules=(1, 1, 1),
        num_blocks=1,
    ),  # tests and smoke runs only
    'w32': HRNetSpec(widths=(32, 64, 128, 256)),
    'w48': HRNetSpec(widths=(48, 96, 192, 384)),
    'w64': HRNetSpec(widths=(64, 128, 256, 512)),
}


class FrozenBatchNorm(nn.Module):
  """BatchNorm in eval mode with its statistics folded in: y = scale * x + bias per channel.

  Initialised to the identity (scale 1, bias 0); weights.py fills it from timm's BatchNorm.

  Attributes:
    dtype: computation dtype.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [..., C]. Returns: [..., C]."""
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    return x * scale.astype(self.dtype) + bias.astype(self.dtype)


class ConvNorm(nn.Module):
  """Convolution (no bias) -> GroupNorm or frozen BatchNorm -> optional ReLU.

  Attributes:
    features: output channels.
    kernel: kernel side (1 or 3; padding keeps size / stride).
    stride: convolution stride.
    relu: apply ReLU after the norm.
    norm: 'group' or 'frozen_bn' (module docstring).
    dtype: computation dtype.
  """

  features: int
  kernel: int = 3
  stride: int = 1
  relu: bool = True
  norm: str = 'group'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [batch, H, W, C]. Returns: [batch, H/stride, W/stride, features]."""
    x = conv.Conv(self.features, self.kernel, self.stride, dtype=self.dtype, name='conv')(x)
    if self.norm == 'group':
      x = nn.GroupNorm(
          num_groups=math.gcd(32, self.features),
          epsilon=1e-5,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name='norm',
      )(x)
    elif self.norm == 'frozen_bn':
      x = FrozenBatchNorm(dtype=self.dtype, name='bn')(x)
    else:
      raise ValueError(f'HRNet norm={self.norm!r}; expected one of {NORMS}')
    return nn.relu(x) if self.relu else x


class BasicBlock(nn.Module):
  """Two 3x3 ConvNorms with a residual (1x1 projection when the width changes)."""

  features: int
  norm: str = 'group'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [batch, H, W, C]. Returns: [batch, H, W, features]."""
    y = ConvNorm(self.features, norm=self.norm, dtype=self.dtype, name='conv1')(x)
    y = ConvNorm(self.features, relu=False, norm=self.norm, dtype=self.dtype, name='conv2')(y)
    if x.shape[-1] != self.features:
      x = ConvNorm(
          self.features, 1, relu=False, norm=self.norm, dtype=self.dtype, name='downsample'
      )(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 (4x wider) ConvNorms with a residual."""

  planes: int
  norm: str = 'group'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [batch, H, W, C]. Returns: [batch, H, W, 4 * planes]."""
    out = BOTTLENECK_EXPANSION * self.planes
    y = ConvNorm(self.planes, 1, norm=self.norm, dtype=self.dtype, name='conv1')(x)
    y = ConvNorm(self.planes, 3, norm=self.norm, dtype=self.dtype, name='conv2')(y)
    y = ConvNorm(out, 1, relu=False, norm=self.norm, dtype=self.dtype, name='conv3')(y)
    if x.shape[-1] != out:
      x = ConvNorm(out, 1, relu=False, norm=self.norm, dtype=self.dtype, name='downsample')(x)
    return nn.relu(x + y)


def _upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
  """Nearest-neighbour upsampling by an integer factor. Args: x: [batch, H, W, C]."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class HRModule(nn.Module):
  """Parallel branches of basic blocks followed by multi-resolution fusion.

  Fusion into branch i sums every branch j: j == i as is; j > i (coarser) by a 1x1 ConvNorm
  then nearest upsampling by 2**(j-i); j < i (finer) by i-j stride-2 3x3 ConvNorms (ReLU on all
  but the last); then ReLU.

  Attributes:
    widths: channel width of each branch.
    num_blocks: basic blocks per branch.
    num_outputs: how many (finest first) fused outputs to compute.
    norm: 'group' or 'frozen_bn'.
    dtype: computation dtype.
  """

  widths: Sequence[int]
  num_blocks: int
  num_outputs: int
  norm: str = 'group'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array]) -> Tuple[jax.Array, ...]:
    """Args: xs: per branch b, [batch, H/2**b, W/2**b, widths[b]]. Returns: fused branches."""
    ys = []
    for b, (x, width) in enumerate(zip(xs, self.widths)):
      for n in range(self.num_blocks):
        x = BasicBlock(width, norm=self.norm, dtype=self.dtype, name=f'branch{b}_block{n}')(x)
      ys.append(x)
    fused = []
    for i in range(self.num_outputs):
      total = ys[i]
      for j, y in enumerate(ys):
        if j > i:
          y = ConvNorm(
              self.widths[i], 1, relu=False, norm=self.norm, dtype=self.dtype, name=f'fuse{i}_{j}'
          )(y)
          total = total + _upsample_nearest(y, 2 ** (j - i))
        elif j < i:
          for k in range(i - j):
            last = k == i - j - 1
            y = ConvNorm(
                self.widths[i] if last else self.widths[j],
                3,
                stride=2,
                relu=not last,
                norm=self.norm,
                dtype=self.dtype,
                name=f'fuse{i}_{j}_{k}',
            )(y)
          total = total + y
      fused.append(nn.relu(total))
    return tuple(fused)


class HRNet(nn.Module):
  """HRNet encoder returning high-resolution tokens and a pooled embedding.

  Attributes:
    spec: the architecture (`HRNET_SIZES[name]`).
    use_depth: create the zero-initialised depth branch added to the stem output.
    depth_zero_init: see `depth.DepthBranch.zero_init`.
    norm: 'group' (from scratch) or 'frozen_bn' (timm weights); see the module docstring.
    dtype: computation dtype (parameters stay float32).
  """

  spec: HRNetSpec
  use_depth: bool = False
  depth_zero_init: str = 'all'
  norm: str = 'group'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, images: jax.Array, depth: Optional[jax.Array] = None
  ) -> Tuple[jax.Array, jax.Array]:
    """Encodes images.

    Args:
      images: [batch, H, W, 3], H and W multiples of 32 (the coarsest branch's stride).
      depth: [batch, H, W, 1]; required when use_depth, rejected otherwise.
    Returns:
      tokens: [batch, (H/4)*(W/4), widths[0]] the high-resolution branch, row-major.
      embedding: [batch, widths[0]] its global average.
    """
    spec, dtype = self.spec, self.dtype
    checks.check_array('images', images, ('batch', 'H', 'W', 3), finite=False)
    coarsest = STEM_STRIDE * 2 ** (len(spec.widths) - 1)
    if images.shape[1] % coarsest or images.shape[2] % coarsest:
      raise ValueError(f'image size {images.shape[1:3]} is not a multiple of {coarsest}')
    depth_lib.check_depth(depth, images.shape, self.use_depth)

    if self.norm not in NORMS:
      raise ValueError(f'HRNet norm={self.norm!r}; expected one of {NORMS}')
    x = ConvNorm(spec.stem_width, 3, stride=2, norm=self.norm, dtype=dtype, name='conv1')(
        images.astype(dtype)
    )
    x = ConvNorm(spec.stem_width, 3, stride=2, norm=self.norm, dtype=dtype, name='conv2')(x)
    if self.use_depth:
      x = x + depth_lib.DepthBranch(
          spec.stem_width,
          depth_lib.num_downsamples(STEM_STRIDE),
          zero_init=self.depth_zero_init,
          dtype=dtype,
          name='depth',
      )(depth)
    for n in range(spec.stage1_blocks):
      x = Bottleneck(spec.stage1_planes, norm=self.norm, dtype=dtype, name=f'layer1_block{n}')(x)

    xs = [x]
    for stage, num_modules in enumerate(spec.num_modules):
      num_branches = stage + 2
      widths = spec.widths[:num_branches]
      xs = self._transition(xs, widths, name=f'transition{stage + 1}')
      for m in range(num_modules):
        final = stage == len(spec.num_modules) - 1 and m == num_modules - 1
        xs = HRModule(
            widths,
            spec.num_blocks,
            1 if final else num_branches,
            norm=self.norm,
            dtype=dtype,
            name=f'stage{stage + 2}_module{m}',
        )(xs)

    high = xs[0]
    tokens = high.reshape(high.shape[0], -1, high.shape[-1])
    embedding = tokens.mean(axis=1)
    return tokens, embedding

  def _transition(self, xs: Sequence[jax.Array], widths: Sequence[int], name: str) -> list:
    """Adapts existing branches to `widths` and adds a stride-2 branch from the coarsest.

    Args:
      xs: per existing branch, [batch, h_b, w_b, c_b].
      widths: the widths of the next stage (one more branch than xs).
      name: prefix of the submodule names.
    Returns:
      One feature map per entry of widths.
    """
    out = []
    for b, x in enumerate(xs):
      if x.shape[-1] != widths[b]:
        x = ConvNorm(widths[b], 3, norm=self.norm, dtype=self.dtype, name=f'{name}_{b}')(x)
      out.append(x)
    out.append(
        ConvNorm(
            widths[len(xs)], 3, stride=2, norm=self.norm, dtype=self.dtype, name=f'{name}_{len(xs)}'
        )(xs[-1])
    )
    return out
