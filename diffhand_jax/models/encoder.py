"""Encoder factory: `config.model` -> a Flax module `(images, depth=None) -> (tokens, embedding)`.

Config keys read (configs/synthetic.py, `config.model`): encoder ('vit' | 'deit' | 'hrnet' |
'resnet'), encoder_size, patch_size, distilled, use_depth, pretrained_path,
pretrained_image_size, depth_zero_init ('all' | 'last'), hrnet_norm ('group' |
'frozen_bn'; 'frozen_bn' holds imported timm BatchNorm weights, see hrnet.py) and
space_to_depth (resnet only, default 1: see resnet.py).

'vit' and 'deit' build the same module (DeiT is the ViT architecture with a different training
recipe); only 'deit' may add the distillation token (distilled=True). Sizes: vit.VIT_SIZES
('micro' is for tests and smoke runs), hrnet.HRNET_SIZES ('w8' likewise), resnet.RESNET_SIZES
('micro' likewise). 'resnet' is the small GroupNorm CNN for training from scratch (DESIGN §4).

A ViT without pretrained weights (pretrained_path empty) gets its position embedding at the
input grid: resampling a from-scratch 14x14 table to 8x8 on every call shrinks its std to
~0.008 against ~1 for the patch embedding (a bag of patches at the start).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffhand_jax.models import hrnet
from diffhand_jax.models import resnet
from diffhand_jax.models import vit

ENCODERS = ('vit', 'deit', 'hrnet', 'resnet')
_SIZES = {
    'vit': vit.VIT_SIZES,
    'deit': vit.VIT_SIZES,
    'hrnet': hrnet.HRNET_SIZES,
    'resnet': resnet.RESNET_SIZES,
}


def _check_name(model_config):
  """Validates encoder / size / distilled and returns (encoder, size)."""
  name, size = model_config.encoder, model_config.encoder_size
  if name not in ENCODERS:
    raise ValueError(f'model.encoder={name!r}; expected one of {ENCODERS}')
  sizes = _SIZES[name]
  if size not in sizes:
    raise ValueError(
        f'model.encoder_size={size!r} is not a {name} size; expected one of ' f'{tuple(sizes)}'
    )
  # The distillation token is DeiT's; HRNet has no tokens to add it to.
  if model_config.distilled and name != 'deit':
    raise ValueError(f'model.distilled=True needs model.encoder="deit", got {name!r}')
  factor = space_to_depth_factor(model_config)
  if factor < 1 or (factor != 1 and name != 'resnet'):
    raise ValueError(
        f'model.space_to_depth={factor!r}: 1, or an integer > 1 with model.encoder="resnet"'
    )
  return name, size


def space_to_depth_factor(model_config) -> int:
  """`model_config.space_to_depth`, 1 where the key is absent (configs that predate it)."""
  return int(model_config.get('space_to_depth', 1))


def encoder_width(model_config) -> int:
  """Token / embedding width D of the encoder that `build_encoder` makes."""
  name, size = _check_name(model_config)
  if name == 'hrnet':
    return hrnet.HRNET_SIZES[size].widths[0]
  if name == 'resnet':
    return resnet.RESNET_SIZES[size].widths[3]
  return vit.VIT_SIZES[size][1]


def encoder_stride(model_config) -> int:
  """Pixels per token side: patch_size for ViT/DeiT, 4 for HRNet's high-resolution branch,
  16 x space_to_depth for the ResNet."""
  name, _ = _check_name(model_config)
  if name == 'resnet':
    return resnet.TOKEN_STRIDE * space_to_depth_factor(model_config)
  return hrnet.STEM_STRIDE if name == 'hrnet' else model_config.patch_size


def num_tokens(model_config, image_size: int) -> int:
  """Number of tokens P for square images of side `image_size`."""
  stride = encoder_stride(model_config)
  if image_size % stride:
    raise ValueError(f'image_size={image_size} is not a multiple of the encoder stride {stride}')
  return (image_size // stride) ** 2


def build_encoder(model_config, dtype: Any = jnp.float32, image_size: int = 0) -> nn.Module:
  """Builds the image encoder described by `config.model`.

  Args:
    model_config: `config.model` (see the module docstring for the keys read).
    dtype: computation dtype (a jnp dtype or its name, e.g. 'bfloat16'); params stay float32.
    image_size: the input side; a ViT without pretrained weights puts its position
      embedding on this grid (0 = model_config.pretrained_image_size).
  Returns:
    A module whose `__call__(images [B,H,W,3], depth=None [B,H,W,1])` returns
    (tokens [B,P,D], embedding [B,D]) with D = encoder_width(model_config).
  """
  name, size = _check_name(model_config)
  dtype = jnp.dtype(dtype)
  if name == 'resnet':
    return resnet.ResNet(
        spec=resnet.RESNET_SIZES[size],
        use_depth=model_config.use_depth,
        depth_zero_init=model_config.depth_zero_init,
        space_to_depth=space_to_depth_factor(model_config),
        dtype=dtype,
    )
  if name == 'hrnet':
    return hrnet.HRNet(
        spec=hrnet.HRNET_SIZES[size],
        use_depth=model_config.use_depth,
        depth_zero_init=model_config.depth_zero_init,
        norm=model_config.hrnet_norm,
        dtype=dtype,
    )
  depth, width, num_heads = vit.VIT_SIZES[size]
  return vit.VisionTransformer(
      width=width,
      depth=depth,
      num_heads=num_heads,
      patch_size=model_config.patch_size,
      distilled=model_config.distilled,
      pretrained_image_size=(
          image_size
          if image_size and not model_config.pretrained_path
          else model_config.pretrained_image_size
      ),
      use_depth=model_config.use_depth,
      depth_zero_init=model_config.depth_zero_init,
      dtype=dtype,
      cpu_kernels=cpu_kernels_enabled(model_config),
  )


def cpu_kernels_enabled(model_config) -> bool:
  """config.model.cpu_kernels (False when absent: configs and checkpoints that predate it)."""
  return bool(model_config.get('cpu_kernels', False))


def init_from_adapter(model_config):
  """`checkpointing.load_params_into`'s `adapt` for this model: carries a ResNet stem kernel
  trained without space-to-depth (input channels C) to a model with factor f (f*f*C), see
  `resnet.stem_kernel_for_space_to_depth`; None when nothing needs carrying."""
  factor = space_to_depth_factor(model_config)
  if model_config.encoder != 'resnet' or factor == 1:
    return None

  def adapt(path, loaded, wanted_shape):
    is_stem = path[-3:] == ('stem', 'conv', 'kernel')
    if is_stem and tuple(wanted_shape) == (
        *loaded.shape[:2],
        loaded.shape[2] * factor**2,
        loaded.shape[3],
    ):
      return resnet.stem_kernel_for_space_to_depth(jnp.asarray(loaded), factor)
    return None

  return adapt
