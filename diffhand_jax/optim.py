"""Optimiser: AdamW with linear warmup + cosine decay, gradient clipping, parameter EMA."""
import jax
import ml_collections
import optax


def learning_rate_schedule(optim_config: ml_collections.ConfigDict,
                           num_steps: int) -> optax.Schedule:
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
    raise ValueError(
        f'optim.warmup_steps={warmup} must be in [0, num_steps={num_steps})')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=num_steps, end_value=0.0)


def _decay_mask(params):
  # Like timm's default: no weight decay on biases and normalisation scales (1-D
  # leaves); kernels, embeddings and position tables (>= 2-D) are decayed.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim_config: ml_collections.ConfigDict,
                   num_steps: int) -> optax.GradientTransformation:
  """Clip by global norm (if grad_clip_norm > 0), then AdamW on the schedule.

  Args:
    optim_config: config.optim (learning_rate, warmup_steps, weight_decay,
      grad_clip_norm).
    num_steps: total training steps (the end of the cosine decay).
  """
  schedule = learning_rate_schedule(optim_config, num_steps)
  adamw = optax.adamw(schedule, weight_decay=float(optim_config.weight_decay),
                      mask=_decay_mask)
  if optim_config.grad_clip_norm and optim_config.grad_clip_norm > 0:
    return optax.chain(
        optax.clip_by_global_norm(float(optim_config.grad_clip_norm)), adamw)
  return adamw


def update_ema(ema_params, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params,
                      params)
