"""Optimiser: AdamW with linear warmup + cosine decay, gradient clipping, parameter EMA."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(
    optim_config: ml_collections.ConfigDict, num_steps: int
) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to 0 at `num_steps`.

  lr(s) = peak * s / W                                   for s < W
  lr(s) = peak * 0.5 * (1 + cos(pi * (s - W) / (T - W)))  for W <= s <= T

  Args:
    optim_config: config.optim (learning_rate, warmup_steps).
    num_steps: T, the total number of training steps.
  """
  peak = float(optim_config.learning_rate)
  warmup = int(optim_config.warmup_steps)
  if num_steps <= 0:
    raise ValueError(f'num_steps must be positive, got {num_steps}')
  if not 0 <= warmup < num_steps:
    raise ValueError(f'optim.warmup_steps={warmup} must be in [0, num_steps={num_steps})')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=num_steps, end_value=0.0
  )


def _decay_mask(params):
  # Like timm's default: no weight decay on biases and normalisation scales (1-D
  # leaves); kernels, embeddings and position tables (>= 2-D) are decayed.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
    optim_config: ml_collections.ConfigDict, num_steps: int
) -> optax.GradientTransformation:
  """Clip by global norm (if grad_clip_norm > 0), then AdamW on the schedule.

  Args:
    optim_config: config.optim (learning_rate, warmup_steps, weight_decay,
      grad_clip_norm).
    num_steps: total training steps (the end of the cosine decay).
  """
  schedule = learning_rate_schedule(optim_config, num_steps)
  adamw = optax.adamw(schedule, weight_decay=float(optim_config.weight_decay), mask=_decay_mask)
  return _clipped(optim_config, adamw)


def _clipped(optim_config, transformation: optax.GradientTransformation):
  """`transformation` after a clip by global norm, if config.optim.grad_clip_norm > 0."""
  if optim_config.grad_clip_norm and optim_config.grad_clip_norm > 0:
    return optax.chain(
        optax.clip_by_global_norm(float(optim_config.grad_clip_norm)), transformation
    )
  return transformation


def make_flat_optimizer(
    optim_config: ml_collections.ConfigDict, num_steps: int, params
) -> optax.GradientTransformation:
  """`make_optimizer`'s transformation for the parameters raveled into one vector.

  The same clip and AdamW (optax's defaults, as `optax.adamw`); for the same gradients it gives
  the same updates up to the summation order of the clip's global norm. The decay mask is
  built inside the update from the leaves' sizes (`decay_mask_vector`), so the compiled step
  holds no parameter-sized constant.

  Args:
    optim_config: config.optim.
    num_steps: total training steps (the end of the cosine decay).
    params: the parameter tree the vector is raveled from, or its `jax.ShapeDtypeStruct`s
      (`jax.tree.leaves` order; only shapes are read).
  """
  leaves = jax.tree.leaves(params)
  sizes = [math.prod(leaf.shape) for leaf in leaves]
  decayed = jax.tree.leaves(_decay_mask(params))
  weight_decay = float(optim_config.weight_decay)

  def decay(updates, state, flat_params):
    mask = decay_mask_vector(sizes, decayed, flat_params.dtype)
    return updates + weight_decay * mask * flat_params, state

  adamw = optax.chain(
      optax.scale_by_adam(),
      optax.GradientTransformation(lambda flat_params: optax.EmptyState(), decay),
      optax.scale_by_learning_rate(learning_rate_schedule(optim_config, num_steps)),
  )
  return _clipped(optim_config, adamw)


def decay_mask_vector(sizes, decayed, dtype) -> jax.Array:
  """[sum(sizes)] 0/1 vector: 1 over the leaves that get weight decay.

  Built from runs of equal flags (a broadcast of a scalar each), never from a host array, so
  under jit it lowers to a few small ops whatever the parameter count.

  Args:
    sizes: elements of each leaf, in `jax.tree.leaves` order.
    decayed: bool per leaf.
    dtype: the vector's dtype.
  """
  runs = []  # [flag, length] of consecutive leaves with the same flag
  for size, flag in zip(sizes, decayed):
    if runs and runs[-1][0] == bool(flag):
      runs[-1][1] += size
    else:
      runs.append([bool(flag), size])
  return jnp.concatenate([jnp.full((length,), float(flag), dtype) for flag, length in runs])


def update_ema(ema_params, params, decay: float, count):
  """The bias-corrected EMA after its `count`-th update, leaf by leaf.

  A zero-initialised EMA m_k = d m_{k-1} + (1 - d) p_k is biased towards 0 by the factor
  1 - d^k (0.9999^1500 leaves 86 % of the weight on the zero start). This keeps the corrected
  value m̂_k = m_k / (1 - d^k) directly, by its own recurrence:

    m̂_k = m̂_{k-1} + w_k (p_k - m̂_{k-1}),  w_k = (1 - d) / (1 - d^k),

  so w_1 = 1 (the first update copies the params) and w_k -> 1 - d; whatever reads the EMA
  (evaluation, checkpoints) needs no correction.

  Args:
    ema_params: m̂_{k-1} (any value when count == 1).
    params: p_k.
    decay: d in (0, 1).
    count: k >= 1, the number of updates including this one (int or int array).
  """
  # 1 - d^k = -expm1(k log d): exact enough in float32 for d close to 1, where 1 - d^k
  # computed directly loses most of its digits (0.9999^k in float32).
  count = jnp.asarray(count, jnp.float32)
  rate = (1.0 - decay) / -jnp.expm1(count * math.log(decay))
  return jax.tree.map(lambda e, p: e + rate.astype(p.dtype) * (p - e), ema_params, params)
