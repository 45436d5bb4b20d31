"""Gaussian diffusion for x0-predicting networks: cosine schedule, q_sample, DDIM.

DESIGN.md §2. All functions are pure; the DDIM reverse loop is one `jax.lax.scan`, so the
compiled program does not grow with the number of sampling steps.

Timestep convention: the discrete index t in {0, ..., T-1} is the (t+1)-th noising step, so
alpha_bar[t] = prod_{i<=t} (1 - beta_i) with beta_i = min(1 - f(i+1)/f(i), 0.999) and
f(u) = cos^2(((u/T + s)/(1 + s)) * pi/2). Without clipping alpha_bar[t] = f(t+1)/f(0): every
index, t = 0 included, adds some noise (alpha_bar < 1), and t = T-1 is (almost) pure noise.
"alpha_bar[-1]" = 1 stands for the clean signal; the last DDIM step moves to it and so
returns x0_hat exactly.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffhand_jax import checks

_MAX_BETA = 0.999


class Schedule(NamedTuple):
  """Noise schedule (a pytree of arrays, so it can be passed through jit).

  Attributes:
    betas: [T] float32 per-step noise variances.
    alphas_cumprod: [T] float32 alpha_bar[t], strictly decreasing in (0, 1).
  """

  betas: jax.Array
  alphas_cumprod: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def cosine_schedule(num_timesteps: int, cosine_s: float = 0.008) -> Schedule:
  """The cosine schedule of Nichol & Dhariwal (computed in float64, stored as float32).

  Args:
    num_timesteps: T, the number of training timesteps (>= 1).
    cosine_s: the small offset s that keeps beta near t = 0 from being tiny.

  Returns:
    The schedule.
  """
  if int(num_timesteps) < 1:
    raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}')
  if not cosine_s >= 0:
    raise ValueError(f'cosine_s must be >= 0, got {cosine_s}')
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((steps + cosine_s) / (1 + cosine_s) * np.pi / 2) ** 2
  betas = np.minimum(1 - f[1:] / f[:-1], _MAX_BETA)
  alphas_cumprod = np.cumprod(1 - betas)
  return Schedule(
      betas=jnp.asarray(betas, jnp.float32), alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32)
  )


def schedule_from_config(config) -> Schedule:
  """`cosine_schedule` with `config.schedule.num_timesteps` and `config.schedule.cosine_s`."""
  return cosine_schedule(config.schedule.num_timesteps, config.schedule.cosine_s)


def _alpha_bar(schedule: Schedule, t: jax.Array, ndim: int) -> jax.Array:
  """alpha_bar[t] with alpha_bar[-1] = 1, shaped [batch, 1, ...] to broadcast over x."""
  t = jnp.asarray(t)
  value = jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)
  return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Forward process: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.

  Args:
    schedule: the noise schedule.
    x0: [batch, ...] clean signal.
    t: [batch] int timesteps in [0, T).
    noise: like x0, standard normal.

  Returns:
    x_t, like x0.
  """
  # Shapes only: q_sample runs traced inside the loss.
  checks.check_array('noise (like x0)', noise, x0.shape, finite=False)
  checks.check_array('t', t, (x0.shape[0],), finite=False)
  alpha_bar = _alpha_bar(schedule, t, x0.ndim).astype(x0.dtype)
  return jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1 - alpha_bar) * noise


def ddim_timesteps(num_timesteps: int, num_sampling_steps: int) -> np.ndarray:
  """Evenly spaced descending sub-sequence tau_S > ... > tau_1 of [0, T).

  "Trailing" spacing: it always starts at T-1 (pure noise, what x_T ~ N(0, I) matches),
  steps by T/S, and so tau_1 = T-1 - floor((S-1) T/S) >= 0.

  Args:
    num_timesteps: T.
    num_sampling_steps: S, in [1, T].

  Returns:
    [S] int32, descending, distinct.
  """
  if not 1 <= num_sampling_steps <= num_timesteps:
    raise ValueError(
        f'num_sampling_steps must be in [1, {num_timesteps}], ' f'got {num_sampling_steps}'
    )
  k = np.arange(num_sampling_steps)
  return (num_timesteps - 1 - (k * num_timesteps) // num_sampling_steps).astype(np.int32)


def ddim_step(
    schedule: Schedule,
    x_t: jax.Array,
    x0_hat: jax.Array,
    t: jax.Array,
    t_next: jax.Array,
    eta: float,
    noise: jax.Array,
) -> jax.Array:
  """One DDIM update x_t -> x_{t_next} (t_next < t; t_next = -1 means the clean signal).

  eps_hat = (x_t - sqrt(a) x0_hat) / sqrt(1 - a);
  x_next = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps_hat + sigma noise,
  sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'), with a = alpha_bar[t],
  a' = alpha_bar[t_next]. For t_next = -1, a' = 1 and x_next = x0_hat.

  Args:
    schedule: the noise schedule.
    x_t: [batch, ...] current sample.
    x0_hat: like x_t, the network's prediction of x0.
    t: scalar or [batch] int current timestep.
    t_next: scalar or [batch] int next timestep (-1 for the end).
    eta: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise.
    noise: like x_t, standard normal (unused when eta = 0).

  Returns:
    x_{t_next}, like x_t.
  """
  alpha = _alpha_bar(schedule, t, x_t.ndim).astype(x_t.dtype)
  alpha_next = _alpha_bar(schedule, t_next, x_t.ndim).astype(x_t.dtype)
  eps_hat = (x_t - jnp.sqrt(alpha) * x0_hat) / jnp.sqrt(1 - alpha)
  sigma = eta * jnp.sqrt((1 - alpha_next) / (1 - alpha) * (1 - alpha / alpha_next))
  # Rounding can make the variance left for eps_hat slightly negative at the last step.
  direction = jnp.sqrt(jnp.maximum(1 - alpha_next - sigma**2, 0.0))
  return jnp.sqrt(alpha_next) * x0_hat + direction * eps_hat + sigma * noise


def ddim_sample(
    denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    x_T: jax.Array,
    timesteps,
    eta: float,
    rng: jax.Array,
) -> jax.Array:
  """DDIM reverse process as one `lax.scan` over the steps; returns x0_hat of the last step.

  Args:
    denoise_fn: (x_t [batch, ...], t [batch] int32) -> x0_hat [batch, ...].
    schedule: the noise schedule.
    x_T: [batch, ...] starting noise.
    timesteps: [S] int descending timesteps (`ddim_timesteps`), static or traced.
    eta: DDIM eta (0 = deterministic given x_T).
    rng: PRNG key for the eta noise (one key per step is split from it).

  Returns:
    x0_hat, like x_T.
  """
  timesteps = checks.check_array('timesteps', jnp.asarray(timesteps, jnp.int32), ('S',))
  if timesteps.shape[0] < 1:
    raise ValueError('timesteps must not be empty')
  next_timesteps = jnp.concatenate([timesteps[1:], jnp.full((1,), -1, jnp.int32)])
  keys = jax.random.split(rng, timesteps.shape[0])
  batch = x_T.shape[0]

  def step(x_t, inputs):
    t, t_next, key = inputs
    x0_hat = denoise_fn(x_t, jnp.full((batch,), t, jnp.int32)).astype(x_t.dtype)
    noise = jax.random.normal(key, x_t.shape, x_t.dtype)
    return ddim_step(schedule, x_t, x0_hat, t, t_next, eta, noise), None

  x0, _ = jax.lax.scan(step, x_T, (timesteps, next_timesteps, keys))
  return x0
