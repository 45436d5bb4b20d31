"""ViT / DeiT image encoder (Flax linen), laid out like timm's `VisionTransformer`.

Output: tokens F = the final-normed patch tokens [batch, (H/p)*(W/p), D]; embedding e = the
final-normed class token [batch, D] (DeiT distilled: the mean of class and distillation tokens,
as timm's distilled DeiT averages its two heads at inference).

Intended timm -> Flax name mapping (`{i}` = block index; Linear kernel = weight.T,
Conv kernel = weight.transpose(2, 3, 1, 0); LayerNorm weight -> scale):
  patch_embed.proj.{weight,bias}   -> patch_embed/{kernel,bias}
  cls_token [1,1,D]                -> cls_token
  dist_token [1,1,D]               -> dist_token         (distilled DeiT only)
  pos_embed [1,prefix+N,D]         -> pos_embed          (same prefix order: cls, dist, patches)
  blocks.{i}.norm1                 -> block{i}/norm1
  blocks.{i}.attn.qkv / attn.proj  -> block{i}/attn/qkv, block{i}/attn/proj
  blocks.{i}.norm2                 -> block{i}/norm2
  blocks.{i}.mlp.fc1 / mlp.fc2     -> block{i}/mlp/fc1, block{i}/mlp/fc2
  norm                             -> norm
  head, head_dist                  -> (dropped: no classifier)
The depth branch (`depth/...`) has no timm counterpart.
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffhand_jax import checks
from diffhand_jax.models import depth as depth_lib
from diffhand_jax.models import layers

Dtype = Any

# timm / DeiT use LayerNorm(eps=1e-6) throughout; flax's default is 1e-5.
LAYER_NORM_EPS = 1e-6

# name -> (depth, width, num_heads); MLP ratio 4 for all.
VIT_SIZES = {
    'micro': (2, 64, 2),  # tests and smoke runs only
    'tiny': (12, 192, 3),
    'small': (12, 384, 6),
    'base': (12, 768, 12),
    'large': (24, 1024, 16),
}
MLP_RATIO = 4


def resample_pos_embed(
    pos_embed: jax.Array,
    old_grid: Sequence[int],
    new_grid: Sequence[int],
    num_prefix_tokens: int = 0,
) -> jax.Array:
  """Bicubically resamples the patch part of a position embedding to a new patch grid.

  Matches timm's `resample_abs_pos_embed` with its defaults (bicubic, antialias=True), which
  PyTorch computes with the antialiased (PIL) bicubic: Keys kernel a = -0.5, widened by the
  scale factor when downsampling, weights renormalised over the taps inside the grid. That is
  the algorithm of `jax.image.resize(..., 'cubic', antialias=True)` (checked against PyTorch
  2.13 `F.interpolate(mode='bicubic', antialias=True)`: equal to 1e-15 in float64). The prefix
  (class / distillation) tokens are passed through untouched.

  Args:
    pos_embed: [batch, num_prefix_tokens + old_h * old_w, D] (batch is 1 for a parameter).
    old_grid: (old_h, old_w) patch grid the embedding was learned on.
    new_grid: (new_h, new_w) target patch grid.
    num_prefix_tokens: number of leading non-patch tokens.
  Returns:
    [batch, num_prefix_tokens + new_h * new_w, D].
  """
  old_h, old_w = old_grid
  new_h, new_w = new_grid
  if pos_embed.ndim != 3 or pos_embed.shape[1] != num_prefix_tokens + old_h * old_w:
    raise ValueError(
        f'pos_embed of shape {pos_embed.shape} does not hold {num_prefix_tokens} '
        f'prefix tokens and a {old_h}x{old_w} grid'
    )
  if (old_h, old_w) == (new_h, new_w):
    return pos_embed
  prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  grid = grid.reshape(grid.shape[0], old_h, old_w, grid.shape[-1])
  # float32 whatever the compute dtype: the grid is tiny, and bf16 would blur pretrained values.
  grid = jax.image.resize(
      grid.astype(jnp.float32),
      (grid.shape[0], new_h, new_w, grid.shape[-1]),
      method='cubic',
      antialias=True,
  ).astype(pos_embed.dtype)
  grid = grid.reshape(grid.shape[0], new_h * new_w, grid.shape[-1])
  return jnp.concatenate([prefix, grid], axis=1)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
    dtype: computation dtype.
    cpu_kernels: the CPU rewrites of layers.py (same parameters and function).
  """

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: [batch, tokens, D]. Returns: [batch, tokens, D]."""
    norm = lambda name: nn.LayerNorm(
        LAYER_NORM_EPS, dtype=self.dtype, param_dtype=jnp.float32, name=name
    )
    cpu = self.cpu_kernels
    attention = layers.SelfAttention(self.num_heads, self.dtype, cpu, name='attn')
    x = x + attention(norm('norm1')(x))
    return x + layers.Mlp(self.mlp_dim, None, self.dtype, cpu, name='mlp')(norm('norm2')(x))


class VisionTransformer(nn.Module):
  """ViT / DeiT encoder returning patch tokens and an image embedding.

  Attributes:
    width: token width D.
    depth: number of transformer blocks.
    num_heads: attention heads.
    patch_size: patch side p; image sides must be multiples of it.
    mlp_ratio: MLP hidden width / D.
    distilled: add DeiT's distillation token.
    pretrained_image_size: image side the position embedding is defined for; other input sizes
      resample it (bicubic) on the fly.
    use_depth: create the zero-initialised depth branch added to the patch embedding.
    depth_zero_init: see `depth.DepthBranch.zero_init`.
    dtype: computation dtype (parameters stay float32).
    cpu_kernels: the CPU rewrites of layers.py in every block.
  """

  width: int
  depth: int
  num_heads: int
  patch_size: int = 16
  mlp_ratio: int = MLP_RATIO
  distilled: bool = False
  pretrained_image_size: int = 224
  use_depth: bool = False
  depth_zero_init: str = 'all'
  dtype: Dtype = jnp.float32
  cpu_kernels: bool = False

  @property
  def num_prefix_tokens(self) -> int:
    return 2 if self.distilled else 1

  @nn.compact
  def __call__(
      self, images: jax.Array, depth: Optional[jax.Array] = None
  ) -> Tuple[jax.Array, jax.Array]:
    """Encodes images.

    Args:
      images: [batch, H, W, 3], H and W multiples of patch_size.
      depth: [batch, H, W, 1]; required when use_depth, rejected otherwise.
    Returns:
      tokens: [batch, (H/p)*(W/p), D] patch tokens.
      embedding: [batch, D] class token (distilled: mean of class and distillation tokens).
    """
    p = self.patch_size
    checks.check_array('images', images, ('batch', 'H', 'W', 3), finite=False)
    batch, height, width_px, _ = images.shape
    if height % p or width_px % p:
      raise ValueError(f'image size {height}x{width_px} is not a multiple of patch {p}')
    depth_lib.check_depth(depth, images.shape, self.use_depth)

    x = nn.Conv(
        self.width,
        (p, p),
        strides=(p, p),
        padding='VALID',
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name='patch_embed',
    )(images.astype(self.dtype))
    if self.use_depth:
      x = x + depth_lib.DepthBranch(
          self.width,
          depth_lib.num_downsamples(p),
          zero_init=self.depth_zero_init,
          dtype=self.dtype,
          name='depth',
      )(depth)
    grid = x.shape[1:3]
    x = x.reshape(batch, grid[0] * grid[1], self.width)

    if self.pretrained_image_size % p:
      raise ValueError(
          f'pretrained_image_size={self.pretrained_image_size} is not a multiple ' f'of patch {p}'
      )
    # The position embedding lives on the pretraining grid (so that timm checkpoints load
    # as they are) and is resampled to the input's grid on every call.
    init_grid = (self.pretrained_image_size // p,) * 2
    embed_init = nn.initializers.truncated_normal(stddev=0.02)
    prefix = [self.param('cls_token', embed_init, (1, 1, self.width), jnp.float32)]
    if self.distilled:
      prefix.append(self.param('dist_token', embed_init, (1, 1, self.width), jnp.float32))
    pos_embed = self.param(
        'pos_embed',
        embed_init,
        (1, self.num_prefix_tokens + init_grid[0] * init_grid[1], self.width),
        jnp.float32,
    )
    pos_embed = resample_pos_embed(pos_embed, init_grid, grid, self.num_prefix_tokens)
    prefix = [jnp.broadcast_to(t, (batch, 1, self.width)).astype(self.dtype) for t in prefix]
    x = jnp.concatenate(prefix + [x], axis=1) + pos_embed.astype(self.dtype)

    for i in range(self.depth):
      x = EncoderBlock(
          self.num_heads,
          self.mlp_ratio * self.width,
          self.dtype,
          self.cpu_kernels,
          name=f'block{i}',
      )(x)
    x = nn.LayerNorm(LAYER_NORM_EPS, dtype=self.dtype, param_dtype=jnp.float32, name='norm')(x)
    tokens = x[:, self.num_prefix_tokens :]
    embedding = x[:, : self.num_prefix_tokens].mean(axis=1)
    return tokens, embedding
