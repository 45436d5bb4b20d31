"""Cross-modality decoder (DESIGN.md §3) and the `vanilla` transformer ablation.

The decoder maps a noisy mesh x_t (diffusion space), the timestep t, the image tokens F and
the image embedding e to x0_hat. Point downsampling uses farthest point sampling computed once
on the template mesh in numpy (`fps_level_indices`), so every shape is static under jit.
"""

import math
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffhand_jax import checks
from diffhand_jax.models.layers import Mlp, MultiHeadAttention, dense

Dtype = Any
LevelIndices = Tuple[Tuple[int, ...], ...]


# ---- Farthest point sampling (numpy, build time) ----


def farthest_point_sampling(points: np.ndarray, num_samples: int) -> np.ndarray:
  """Greedy farthest point sampling, starting from point 0.

  Each new point maximises the Euclidean distance to the points already picked (ties: lowest
  index, as np.argmax). The order is a prefix code: the first m picks are the m-point FPS.

  Args:
    points: [num_points, 3] float.
    num_samples: how many to pick, in [1, num_points].

  Returns:
    [num_samples] int32 distinct indices into `points`, in pick order.
  """
  points = checks.check_array('points', points, ('num_points', 'dims'), dtype=np.float64)
  if not 1 <= num_samples <= points.shape[0]:
    raise ValueError(f'num_samples must be in [1, {points.shape[0]}], got {num_samples}')
  picked = np.zeros(num_samples, np.int64)
  min_dist = np.sum((points - points[0]) ** 2, axis=-1)
  for i in range(1, num_samples):
    picked[i] = np.argmax(min_dist)
    min_dist = np.minimum(min_dist, np.sum((points - points[picked[i]]) ** 2, axis=-1))
  return picked.astype(np.int32)


def level_sizes(num_points: int, rate: int, num_levels: int) -> Tuple[int, ...]:
  """Point counts N, N//r, N//r^2, ... (num_levels + 1 entries)."""
  sizes = [num_points]
  for _ in range(num_levels):
    sizes.append(sizes[-1] // rate)
  if rate < 2 or sizes[-1] < 1:
    raise ValueError(f'cannot downsample {num_points} points {num_levels} times by rate {rate}')
  return tuple(sizes)


def fps_level_indices(template: np.ndarray, rate: int, num_levels: int) -> LevelIndices:
  """Nested FPS indices of the U-shaped vertex block, as hashable tuples.

  Level k (k = 1..num_levels) keeps N // r^k points picked by FPS among the points of level
  k-1, so each level is a subset of the previous one.

  Args:
    template: [N, 3] template mesh vertices.
    rate: downsampling rate r (>= 2).
    num_levels: number of downsamplings.

  Returns:
    num_levels tuples; tuple k-1 indexes the points of level k-1 (level 0 = all N vertices).
  """
  template = np.asarray(template)
  sizes = level_sizes(template.shape[0], rate, num_levels)
  indices, points = [], template
  for size in sizes[1:]:
    picked = farthest_point_sampling(points, size)
    indices.append(tuple(int(i) for i in picked))
    points = points[picked]
  return tuple(indices)


# ---- Embeddings ----


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of integer timesteps (cos | sin halves).

  Args:
    t: [batch] timesteps.
    dim: embedding width (even).

  Returns:
    [batch, dim] float32.
  """
  if dim % 2:
    raise ValueError(f'timestep embedding width must be even, got {dim}')
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


# ---- Blocks ----


class AttentionBlock(nn.Module):
  """Fig. 3c: self-attention over points, + g, cross-attention to image tokens, MLP.

  All three sublayers are pre-norm with residuals; g is added after the self-attention
  residual, broadcast over points.
  """

  num_heads: int
  mlp_ratio: int
  dtype: Dtype = jnp.float32
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, g: jax.Array, tokens: jax.Array) -> jax.Array:
    """Args: h: [B, n, C] points; g: [B, C]; tokens: [B, P, C]. Returns: [B, n, C]."""
    width = h.shape[-1]
    attention = lambda name: MultiHeadAttention(
        self.num_heads, self.dtype, self.cpu_kernels, name=name
    )
    x = _layer_norm(self.dtype, 'norm_self')(h)
    h = h + attention('self_attention')(x, x)
    h = h + g[:, None, :].astype(h.dtype)
    x = _layer_norm(self.dtype, 'norm_cross')(h)
    h = h + attention('cross_attention')(x, tokens)
    x = _layer_norm(self.dtype, 'norm_mlp')(h)
    mlp = Mlp(self.mlp_ratio * width, dtype=self.dtype, cpu_kernels=self.cpu_kernels, name='mlp')
    return h + mlp(x)


class FeatureBlock(nn.Module):
  """Fig. 3b: pre-norm MLP over channels (each point separately) with a residual."""

  mlp_ratio: int
  dtype: Dtype = jnp.float32
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    """Args: h: [B, n, C]. Returns: [B, n, C]."""
    x = _layer_norm(self.dtype, 'norm')(h)
    width = self.mlp_ratio * h.shape[-1]
    return h + Mlp(width, dtype=self.dtype, cpu_kernels=self.cpu_kernels, name='mlp')(x)


class PointUpsample(nn.Module):
  """Learned linear map over the point axis: [B, n_in, C] -> [B, n_out, C]."""

  num_points: int
  dtype: Dtype = jnp.float32
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    point_map = dense(self.num_points, self.dtype, 'point_map', self.cpu_kernels)
    out = point_map(jnp.swapaxes(h, 1, 2))
    return jnp.swapaxes(out, 1, 2)


class VertexBlock(nn.Module):
  """Fig. 3a: U-shaped vertex block.

  Down path: level 0 (all N points) -> gather the FPS subset -> attention block -> level 1
  -> ... -> level L. Up path: level k -> PointUpsample to level k-1's count + the down-path
  features of level k-1 (lateral residual), for k = L..1.

  At the full level (N points) no attention runs (the paper places attention blocks after
  each downsampling only; full-resolution self-attention is also the costliest part): the
  output there is the upsampled level-1 features plus the block's input (the lateral
  residual of level 0). Per-point channel mixing at full resolution is the feature block's
  job, which follows every vertex block.

  Attributes:
    level_indices: `fps_level_indices(...)`: level k's indices into level k-1's points.
  """

  level_indices: LevelIndices
  num_heads: int
  mlp_ratio: int
  dtype: Dtype = jnp.float32
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, g: jax.Array, tokens: jax.Array) -> jax.Array:
    """Args: h: [B, N, C]; g: [B, C]; tokens: [B, P, C]. Returns: [B, N, C]."""
    down = [h]
    for level, indices in enumerate(self.level_indices, start=1):
      x = jnp.take(down[-1], np.asarray(indices, np.int32), axis=1)
      down.append(
          AttentionBlock(
              self.num_heads,
              self.mlp_ratio,
              self.dtype,
              self.cpu_kernels,
              name=f'down_attention_{level}',
          )(x, g, tokens)
      )
    up = down[-1]
    for level in range(len(self.level_indices), 0, -1):
      target = down[level - 1]
      upsample = PointUpsample(
          target.shape[1], self.dtype, self.cpu_kernels, name=f'upsample_{level}'
      )
      up = upsample(up) + target
    return up


class Decoder(nn.Module):
  """x0-predicting mesh decoder: cross-modality (U-shaped) or vanilla transformer.

  Attributes:
    num_points: N, vertices of the mesh (778 for MANO).
    width: channels C.
    num_heads: attention heads.
    num_blocks: cross-modality blocks (vertex block + feature block each).
    mlp_ratio: MLP hidden width / C.
    level_indices: nested FPS indices (`fps_level_indices`); their count is the number of
      downsamplings L.
    kind: 'cross_modality' or 'vanilla'. Vanilla = num_blocks * L plain transformer layers
      (`AttentionBlock`: self-attention + g + cross-attention + MLP) over all N points, no
      U-shape and no feature blocks: the same number of attention blocks as the
      cross-modality decoder (at least one per block), so the ablation changes where
      attention runs, not how often.
    dtype: computation dtype (parameters are float32; the output is float32).
    remat: recompute each block's activations in the backward pass instead of keeping them
      (`nn.remat`): less memory per step for about one more forward pass; same parameters.
    cpu_kernels: the CPU rewrites of layers.py (same parameters and function).
  """

  num_points: int
  width: int
  num_heads: int
  num_blocks: int
  mlp_ratio: int
  level_indices: LevelIndices
  kind: str = 'cross_modality'
  dtype: Dtype = jnp.float32
  remat: bool = False
  cpu_kernels: bool = False

  @nn.compact
  def __call__(
      self, x_t: jax.Array, t: jax.Array, tokens: jax.Array, embedding: jax.Array
  ) -> jax.Array:
    """Predicts x0.

    Args:
      x_t: [B, N, 3] noisy vertices in diffusion space.
      t: [B] int timesteps.
      tokens: [B, P, D] image tokens.
      embedding: [B, D] image embedding.

    Returns:
      [B, N, 3] float32 x0_hat.
    """
    # Shapes only: the decoder runs traced, inside the sampler's scan.
    checks.check_array('x_t', x_t, ('batch', self.num_points, 3), finite=False)
    batch = x_t.shape[0]
    checks.check_array('t', t, (batch,), finite=False)
    tokens = checks.check_array('tokens', tokens, (batch, 'P', 'D'), finite=False)
    checks.check_array('embedding', embedding, (batch, tokens.shape[-1]), finite=False)
    if self.kind not in ('cross_modality', 'vanilla'):
      raise ValueError(f"decoder kind must be 'cross_modality' or 'vanilla', got {self.kind!r}")

    position = self.param(
        'position_embedding',
        nn.initializers.normal(0.02),
        (self.num_points, self.width),
        jnp.float32,
    )
    cpu = self.cpu_kernels
    h = dense(self.width, self.dtype, 'vertex_embed', cpu)(x_t) + position.astype(self.dtype)
    time_mlp = Mlp(self.width, dtype=self.dtype, cpu_kernels=cpu, name='time_mlp')
    time_features = time_mlp(timestep_embedding(t, self.width))
    g = dense(self.width, self.dtype, 'global_embed', cpu)(embedding) + time_features
    tokens = dense(self.width, self.dtype, 'token_proj', cpu)(tokens)

    wrap = nn.remat if self.remat else (lambda module: module)
    vertex_block, feature_block, attention_block = (
        wrap(VertexBlock),
        wrap(FeatureBlock),
        wrap(AttentionBlock),
    )
    for block in range(self.num_blocks):
      if self.kind == 'cross_modality':
        h = vertex_block(
            self.level_indices,
            self.num_heads,
            self.mlp_ratio,
            self.dtype,
            cpu,
            name=f'vertex_block_{block}',
        )(h, g, tokens)
        h = feature_block(self.mlp_ratio, self.dtype, cpu, name=f'feature_block_{block}')(h)
      else:
        for layer in range(max(1, len(self.level_indices))):
          h = attention_block(
              self.num_heads, self.mlp_ratio, self.dtype, cpu, name=f'layer_{block}_{layer}'
          )(h, g, tokens)
    h = _layer_norm(self.dtype, 'norm_out')(h)
    return dense(3, self.dtype, 'out', cpu)(h).astype(jnp.float32)
