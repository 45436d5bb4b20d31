"""The diffusion machinery on a problem whose posterior is known in closed form (issue 36).

A condition c in {0, 1, 2} picks a 2-D Gaussian mixture p(x | c) (2 or 3 isotropic modes whose
weights, means and widths depend on c). A tiny x0-predicting MLP f(x_t, t, c) is trained with
the project's own step (train_step.train_step, noisy_input with its share of t = T - 1, the
cosine schedule, q_sample) and sampled with the project's DDIM (ddim_sample, ddim_timesteps).
Every number is asserted against closed forms computed here in numpy:

- the one-step x0_hat at t = T - 1 is the posterior mean E[x | c];
- DDIM samples reproduce the mode weights, means and widths;
- the error of one sample is larger than the error of the posterior mean by the closed-form
  factor: for a draw x ~ p(x | c) and an independent truth x* ~ p(x | c),
  E|x - x*|^2 = 2 tr Cov[x | c], while E|E[x | c] - x*|^2 = tr Cov[x | c].

Ten DDIM steps with eta = 0 are not an exact posterior sampler: even with the exact denoiser
they narrow every mode (a Gaussian of width 0.35 comes out 0.81 as wide, of width 1 0.88 as
wide: a closed form checked below; the mixture's modes 7-13% narrower) and pull the modes
0.2-0.3 widths together. So the checks against the true mixture use S = 100 (within 3% of
exact), and the checks at S = 10 allow, on top of the same tolerances, the error that the
exact denoiser makes through the same 10 steps.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffhand_jax import diffusion
from diffhand_jax import train_step as train_step_lib

T = 1000
# The share of each batch at t = T - 1 (DESIGN §5), through the project's noisy_input.
# configs/synthetic.py uses 0.5; 0.25 leaves more of this test's small budget to t < T - 1
# (with 0.5 the mode means at S = 100 are off by up to 0.23 widths instead of 0.13).
T_MAX_FRACTION = 0.25

# ---- The problem: p(x | c), C = 3 conditions, K = 3 mode slots (weight 0 = no mode) ----
MODE_WEIGHTS = np.array([[0.5, 0.5, 0.0], [0.3, 0.7, 0.0], [0.4, 0.35, 0.25]])  # [C, K]
MODE_MEANS = np.array(  # [C, K, 2]
    [
        [[-1.2, 0.0], [1.2, 0.0], [0.0, 0.0]],
        [[-0.6, 1.2], [1.2, -0.6], [0.0, 0.0]],
        [[-1.2, -0.9], [1.2, -0.9], [0.0, 1.3]],
    ]
)
MODE_STDS = np.array([[0.35, 0.35, 1.0], [0.35, 0.45, 1.0], [0.35, 0.35, 0.35]])  # [C, K]
NUM_CONDITIONS = MODE_WEIGHTS.shape[0]
DATA_VARIANCE = 0.8  # per-axis variance of x, roughly (for the network's scalings only)


def posterior_mean() -> np.ndarray:
  """E[x | c] = sum_k w_k m_k.

  Returns:
    [C, 2] float64.
  """
  return np.einsum('ck,ckd->cd', MODE_WEIGHTS, MODE_MEANS)


def posterior_total_variance() -> np.ndarray:
  """tr Cov[x | c] = sum_k w_k (2 s_k^2 + |m_k|^2) - |E[x | c]|^2 (2-D isotropic modes).

  Returns:
    [C] float64.
  """
  second_moment = np.sum(MODE_WEIGHTS * (2 * MODE_STDS**2 + np.sum(MODE_MEANS**2, -1)), -1)
  return second_moment - np.sum(posterior_mean() ** 2, -1)


def draw_x0(key: jax.Array, c: jax.Array) -> jax.Array:
  """Exact draws x ~ p(x | c).

  Args:
    key: PRNG key.
    c: [B] int conditions.

  Returns:
    [B, 2] float32.
  """
  mode_key, normal_key = jax.random.split(key)
  log_weights = jnp.log(jnp.asarray(MODE_WEIGHTS, jnp.float32))[c]  # log 0 = -inf: never drawn
  mode = jax.random.categorical(mode_key, log_weights)
  means = jnp.asarray(MODE_MEANS, jnp.float32)[c, mode]
  stds = jnp.asarray(MODE_STDS, jnp.float32)[c, mode]
  return means + stds[:, None] * jax.random.normal(normal_key, means.shape)


def exact_denoiser(schedule: diffusion.Schedule, x_t: jax.Array, t: jax.Array, c: jax.Array):
  """The Bayes-optimal x0 prediction E[x0 | x_t, c] of the mixture, in closed form.

  Given mode k, x_t ~ N(sqrt(a) m_k, (a s_k^2 + 1 - a) I) and
  E[x0 | x_t, k] = m_k + sqrt(a) s_k^2 / (a s_k^2 + 1 - a) (x_t - sqrt(a) m_k), a = alpha_bar_t;
  the modes are weighted by their posterior responsibilities.

  Args:
    schedule: the noise schedule.
    x_t: [B, 2] noisy samples.
    t: [B] int timesteps in [0, T).
    c: [B] int conditions.

  Returns:
    [B, 2] float32.
  """
  alpha = schedule.alphas_cumprod[t][:, None]  # [B, 1]
  means = jnp.asarray(MODE_MEANS, jnp.float32)[c]  # [B, K, 2]
  variances = jnp.asarray(MODE_STDS, jnp.float32)[c] ** 2  # [B, K]
  weights = jnp.asarray(MODE_WEIGHTS, jnp.float32)[c]
  marginal = alpha * variances + 1 - alpha  # [B, K]
  residual = x_t[:, None] - jnp.sqrt(alpha)[..., None] * means  # [B, K, 2]
  log_resp = (
      jnp.log(jnp.maximum(weights, 1e-30))
      - jnp.sum(residual**2, -1) / (2 * marginal)
      - jnp.log(marginal)  # 2-D: the normaliser is (2 pi var)^(-2/2)
  )
  resp = jax.nn.softmax(log_resp, axis=-1)
  gain = (jnp.sqrt(alpha) * variances / marginal)[..., None]
  return jnp.sum(resp[..., None] * (means + gain * residual), axis=1)


def mode_statistics(samples: np.ndarray, c: int):
  """Per-mode fraction, mean and width of samples of condition c, each assigned to the nearest
  mode mean (half the gap between two modes is >= 2.8 widths: misassignment is <= 0.3%).

  Args:
    samples: [N, 2].
    c: the condition.

  Returns:
    (fractions [K], means [K, 2], stds [K]) over the modes with nonzero weight (NaN for a
    mode without samples); std = sqrt(per-axis variance averaged over the 2 axes).
  """
  real = MODE_WEIGHTS[c] > 0
  distance = np.sum((samples[:, None] - MODE_MEANS[c][None, real]) ** 2, -1)
  nearest = np.argmin(distance, axis=1)
  fractions, means, stds = [], [], []
  for k in range(int(real.sum())):
    members = samples[nearest == k]
    fractions.append(len(members) / len(samples))
    means.append(members.mean(0) if len(members) else np.full(2, np.nan))
    stds.append(np.sqrt(members.var(0).mean()) if len(members) > 1 else np.nan)
  return np.array(fractions), np.array(means), np.array(stds)


# ---- The network and its training ----
def time_features(t: jax.Array, alpha: jax.Array, num_frequencies: int = 4) -> jax.Array:
  """A smooth embedding of t: log(noise-to-signal) / 4 and Fourier features of t / T.

  The decoder's sinusoidal embedding (periods from 2 pi to 2 pi 10^4 steps) spends half its
  channels on periods shorter than ~30 steps, noise for a function this smooth in t.

  Args:
    t: [B] int timesteps.
    alpha: [B, 1] alpha_bar_t.

  Returns:
    [B, 1 + 2 num_frequencies] float32.
  """
  angles = (t[:, None] / T) * np.pi * 2.0 ** jnp.arange(num_frequencies)
  log_sigma = 0.5 * jnp.log((1 - alpha) / alpha)
  return jnp.concatenate([log_sigma / 4, jnp.cos(angles), jnp.sin(angles)], axis=-1)


class Denoiser(nn.Module):
  """x0_hat = f(x_t, t, c): an MLP on [scaled x_t, time_features, one-hot c].

  The output is x0_hat itself (the loss is the project's x0 loss), written with the skip and
  scalings of Karras et al. (EDM) so that a tiny MLP is accurate at small t as well:
  x0_hat = c_skip(t) x_t + c_out(t) F([x_t / sqrt(a s_d^2 + 1 - a), time_features(t), c]),
  c_skip = sqrt(a) s_d^2 / (a s_d^2 + 1 - a), c_out = sqrt(1 - a) s_d / sqrt(a s_d^2 + 1 - a),
  a = alpha_bar_t, s_d^2 = DATA_VARIANCE: the Bayes-optimal x0_hat for data N(0, s_d^2 I) plus
  a correction of unit scale. At t = T - 1 (a ~ 2e-9) x0_hat = s_d F(x_t, c).
  """

  width: int = 128
  depth: int = 3

  @nn.compact
  def __call__(self, x_t: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
    """x_t: [B, 2]; t: [B] int; c: [B] int. Returns x0_hat [B, 2]."""
    alpha = diffusion.cosine_schedule(T).alphas_cumprod[t][:, None]
    marginal = alpha * DATA_VARIANCE + 1 - alpha
    h = jnp.concatenate(
        [
            x_t / jnp.sqrt(marginal),
            time_features(t, alpha),
            jax.nn.one_hot(c, NUM_CONDITIONS),
        ],
        axis=-1,
    )
    for _ in range(self.depth):
      h = nn.silu(nn.Dense(self.width)(h))
    correction = nn.Dense(2)(h)
    c_skip = jnp.sqrt(alpha) * DATA_VARIANCE / marginal
    c_out = jnp.sqrt((1 - alpha) * DATA_VARIANCE / marginal)
    return c_skip * x_t + c_out * correction


NUM_TRAIN_STEPS = 6000
BATCH_SIZE = 256
PEAK_LR = 1e-2


def train(seed: int = 0, num_steps: int = NUM_TRAIN_STEPS, batch_size: int = BATCH_SIZE):
  """Trains Denoiser with the project's train step; the data are fresh exact draws each step.

  Returns:
    (model, params, per-100-step mean losses [num_steps // 100]).
  """
  model = Denoiser()
  schedule = diffusion.cosine_schedule(T)
  init_key, data_key, state_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = model.init(
      init_key, jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)
  )['params']
  lr = optax.cosine_decay_schedule(PEAK_LR, num_steps)
  optimizer = optax.adam(lr)

  def loss_fn(params, batch, keys):
    # The project's t rule: T - 1 with probability T_MAX_FRACTION, else uniform in [0, T).
    x_t, t = train_step_lib.noisy_input(
        schedule, batch['x0'], keys, diffusion=True, t_max_fraction=T_MAX_FRACTION
    )
    x0_hat = model.apply({'params': params}, x_t, t, batch['c'])
    return jnp.mean(jnp.sum((x0_hat - batch['x0']) ** 2, -1)), {}

  step_fn = functools.partial(
      train_step_lib.train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=lr, ema_decay=0.0
  )

  def body(state, _):
    c_key, x_key = jax.random.split(jax.random.fold_in(data_key, state.step))
    c = jax.random.randint(c_key, (batch_size,), 0, NUM_CONDITIONS)
    state, metrics = step_fn(state, {'c': c, 'x0': draw_x0(x_key, c)})
    return state, metrics['loss']

  state = train_step_lib.create_train_state(params, optimizer, state_key, ema_decay=0.0)
  state, losses = jax.jit(lambda s: jax.lax.scan(body, s, None, length=num_steps))(state)
  return model, state.params, np.asarray(losses).reshape(-1, 100).mean(1)


# ---- Sampling and measuring ----
@functools.partial(jax.jit, static_argnames=('denoise', 'num_sampling_steps'))
def sample(denoise, c: jax.Array, x_T: jax.Array, num_sampling_steps: int) -> jax.Array:
  """DDIM (eta = 0) with the project's sampler; denoise(x_t, t, c) -> x0_hat.

  Args:
    c: [B] int conditions.
    x_T: [B, 2] starting noises.

  Returns:
    [B, 2] samples.
  """
  schedule = diffusion.cosine_schedule(T)
  return diffusion.ddim_sample(
      lambda x_t, t: denoise(x_t, t, c),
      schedule,
      x_T,
      diffusion.ddim_timesteps(T, num_sampling_steps),
      0.0,
      jax.random.PRNGKey(0),
  )


NUM_SAMPLES = 4096  # starting noises per condition


def conditions_and_noise():
  """The evaluation set: NUM_SAMPLES starting noises for each condition.

  Returns:
    (c [C * NUM_SAMPLES] int32, x_T [C * NUM_SAMPLES, 2] float32).
  """
  c = jnp.repeat(jnp.arange(NUM_CONDITIONS, dtype=jnp.int32), NUM_SAMPLES)
  return c, jax.random.normal(jax.random.PRNGKey(123), (c.shape[0], 2))


def per_condition(x) -> np.ndarray:
  """[C * NUM_SAMPLES, 2] -> [C, NUM_SAMPLES, 2] float64."""
  return np.asarray(x, np.float64).reshape(NUM_CONDITIONS, NUM_SAMPLES, 2)


def exact(x_t, t, c):
  """exact_denoiser on the project's schedule, as a denoise(x_t, t, c) function."""
  return exact_denoiser(diffusion.cosine_schedule(T), x_t, t, c)


@functools.lru_cache(maxsize=None)
def exact_samples(num_sampling_steps: int) -> np.ndarray:
  """DDIM samples of the exact denoiser from the evaluation noises: [C, NUM_SAMPLES, 2]."""
  c, x_T = conditions_and_noise()
  return per_condition(sample(exact, c, x_T, num_sampling_steps))


def mixture_errors(samples: np.ndarray):
  """Errors of the per-mode statistics of samples against the closed form.

  Args:
    samples: [C, NUM_SAMPLES, 2].

  Returns:
    dict: weight (absolute), mean (|mean error| / true width), std (|std / true std - 1|),
    each [C, K] with NaN for the slots without a mode.
  """
  errors = {name: np.full(MODE_WEIGHTS.shape, np.nan) for name in ('weight', 'mean', 'std')}
  for c in range(NUM_CONDITIONS):
    real = MODE_WEIGHTS[c] > 0
    fractions, means, stds = mode_statistics(samples[c], c)
    errors['weight'][c, real] = np.abs(fractions - MODE_WEIGHTS[c, real])
    errors['mean'][c, real] = (
        np.linalg.norm(means - MODE_MEANS[c, real], axis=-1) / MODE_STDS[c, real]
    )
    errors['std'][c, real] = np.abs(stds / MODE_STDS[c, real] - 1)
  return errors


def squared_errors_to_truth(predictions: np.ndarray) -> np.ndarray:
  """|prediction - x*|^2 per condition, x* an independent exact draw for each prediction.

  Args:
    predictions: [C, NUM_SAMPLES, 2].

  Returns:
    [C] mean squared errors.
  """
  c, _ = conditions_and_noise()
  truth = per_condition(draw_x0(jax.random.PRNGKey(7), c))
  return np.mean(np.sum((predictions - truth) ** 2, -1), -1)


# ---- Tests ----
def test_closed_forms_match_monte_carlo():
  """The closed-form mean and total variance of p(x | c) against 10^5 exact draws each."""
  num = 100_000
  c = jnp.repeat(jnp.arange(NUM_CONDITIONS), num)
  x = np.asarray(draw_x0(jax.random.PRNGKey(1), c), np.float64).reshape(NUM_CONDITIONS, num, 2)
  np.testing.assert_allclose(x.mean(1), posterior_mean(), atol=0.015)
  np.testing.assert_allclose(x.var(1).sum(-1), posterior_total_variance(), rtol=0.02)


@pytest.mark.parametrize('width', [0.35, 1.0])
def test_ten_ddim_steps_narrow_a_gaussian_by_the_closed_form_factor(width):
  """Data N(m, s^2 I) and its exact (linear) denoiser: DDIM is linear in x_T.

  With u_t = x_t - sqrt(a_t) m, each eta = 0 step multiplies u by
  g = sqrt(a') k + sqrt((1 - a') / (1 - a)) (1 - sqrt(a) k), k = sqrt(a) s^2 / (a s^2 + 1 - a),
  so x0 = m + (prod g) u_T. The exact answer has std s, i.e. prod g = s; S = 10 gives less.
  """
  schedule = diffusion.cosine_schedule(T)
  alpha_bar = np.asarray(schedule.alphas_cumprod, np.float64)
  mean = jnp.array([0.7, -0.4])

  def denoise(x_t, t):
    a = schedule.alphas_cumprod[t][:, None]
    gain = jnp.sqrt(a) * width**2 / (a * width**2 + 1 - a)
    return mean + gain * (x_t - jnp.sqrt(a) * mean)

  x_T = jax.random.normal(jax.random.PRNGKey(0), (512, 2))
  for num_steps, expected_ratio in ((10, None), (T, 1.0)):
    timesteps = diffusion.ddim_timesteps(T, num_steps)
    gain = 1.0
    for i, t in enumerate(timesteps):
      a = alpha_bar[t]
      a_next = alpha_bar[timesteps[i + 1]] if i + 1 < num_steps else 1.0
      k = np.sqrt(a) * width**2 / (a * width**2 + 1 - a)
      gain *= np.sqrt(a_next) * k + np.sqrt((1 - a_next) / (1 - a)) * (1 - np.sqrt(a) * k)
    out = diffusion.ddim_sample(denoise, schedule, x_T, timesteps, 0.0, jax.random.PRNGKey(1))
    expected = np.asarray(mean) + gain * (np.asarray(x_T) - np.sqrt(alpha_bar[-1]) * mean)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)
    if expected_ratio is None:
      # 10 steps: 0.81 (s = 0.35) and 0.88 (s = 1) of the true width, whatever the denoiser.
      assert 0.75 < gain / width < 0.9, gain / width
    else:
      assert gain / width == pytest.approx(expected_ratio, abs=0.01)


def test_exact_denoiser_through_ddim_recovers_the_mixture():
  """The sampler alone: the closed-form E[x0 | x_t, c] through ddim_sample.

  S = 100 reproduces the mixture; S = 10 keeps the mode weights but narrows the modes by
  7-13% and pulls them 0.2-0.3 widths towards each other (DDIM's discretisation, not noise:
  4096 samples per condition, the standard error of a width is ~2%).
  """
  errors = mixture_errors(exact_samples(100))
  assert np.nanmax(errors['weight']) < 0.02, errors
  assert np.nanmax(errors['mean']) < 0.15, errors
  assert np.nanmax(errors['std']) < 0.05, errors
  errors = mixture_errors(exact_samples(10))
  assert np.nanmax(errors['weight']) < 0.05, errors
  assert 0.05 < np.nanmin(errors['std']) and np.nanmax(errors['std']) < 0.2, errors


@pytest.fixture(scope='module')
def network():
  """The trained Denoiser as denoise(x_t, t, c) -> x0_hat, and its loss curve."""
  model, params, losses = train()
  return functools.partial(_apply, model, params), losses


def _apply(model, params, x_t, t, c):
  return model.apply({'params': params}, x_t, t, c)


def test_training_reaches_the_bayes_loss(network):
  """The x0 loss of the trained network vs that of the exact denoiser (the Bayes floor).

  Both on the same 65,536 fresh draws of (c, x0, t, noise), t drawn by noisy_input.
  """
  denoise, losses = network
  assert np.all(np.isfinite(losses))
  num = 65_536

  @jax.jit
  def both_losses(key):
    c_key, x_key, noise_key = jax.random.split(key, 3)
    c = jax.random.randint(c_key, (num,), 0, NUM_CONDITIONS)
    x0 = draw_x0(x_key, c)
    x_t, t = train_step_lib.noisy_input(
        diffusion.cosine_schedule(T),
        x0,
        jax.random.split(noise_key, num),
        diffusion=True,
        t_max_fraction=T_MAX_FRACTION,
    )
    squared_error = lambda x0_hat: jnp.mean(jnp.sum((x0_hat - x0) ** 2, -1))
    return squared_error(exact(x_t, t, c)), squared_error(denoise(x_t, t, c))

  bayes, trained = map(float, both_losses(jax.random.PRNGKey(99)))
  print(f'x0 loss: Bayes {bayes:.4f}, trained {trained:.4f}')
  assert 1.0 < bayes < 1.2, bayes
  assert trained - bayes < 0.005, (trained, bayes)


def test_one_step_x0_at_t_max_is_the_posterior_mean(network):
  """At t = T - 1 (alpha_bar ~ 2e-9) the optimal x0_hat is E[x | c], whatever the noise."""
  denoise, _ = network
  c, x_T = conditions_and_noise()
  x0_hat = per_condition(denoise(x_T, jnp.full_like(c, T - 1), c))
  # Per noise: RMS over the noises within 5% of the posterior std (~1.1), the rare extreme
  # noise (|x_T| ~ 4) within 0.25.
  deviation = np.linalg.norm(x0_hat - posterior_mean()[:, None], axis=-1)  # [C, NUM_SAMPLES]
  assert np.sqrt(np.mean(deviation**2, 1)).max() < 0.05, np.sqrt(np.mean(deviation**2, 1))
  assert deviation.max() < 0.25, deviation.max()
  np.testing.assert_allclose(x0_hat.mean(1), posterior_mean(), atol=0.02)


def test_ddim_samples_reproduce_the_mixture(network):
  """Mode weights, means and widths of the trained network's DDIM samples.

  S = 100 (the sampler is within 3% of exact, test above): against the closed form, weights
  within 0.05 (absolute), means within 0.25 mode widths (~0.1, 4% of the distance between
  modes), widths within 10%. S = 10: the same tolerances on top of the error that the exact
  denoiser makes through the same 10 steps.
  """
  denoise, _ = network
  c, x_T = conditions_and_noise()
  tolerances = {'weight': 0.05, 'mean': 0.25, 'std': 0.10}
  errors = mixture_errors(per_condition(sample(denoise, c, x_T, 100)))
  for name, tolerance in tolerances.items():
    assert np.nanmax(errors[name]) < tolerance, (name, errors[name])
  errors = mixture_errors(per_condition(sample(denoise, c, x_T, 10)))
  exact_errors = mixture_errors(exact_samples(10))
  for name, tolerance in tolerances.items():
    excess = errors[name] - exact_errors[name]
    assert np.nanmax(excess) < tolerance, (name, errors[name], exact_errors[name])


def test_one_sample_is_sqrt2_further_from_the_truth_than_the_posterior_mean(network):
  """E|x - x*|^2 = 2 tr Cov[x | c] for a posterior draw x; tr Cov[x | c] for E[x | c].

  Truths x* are independent exact draws. The posterior mean is the network's one-step x0_hat
  at t = T - 1; the draws are its DDIM samples. S = 100 samples the posterior: the ratio is
  2 (RMS sqrt 2). S = 10 narrows the modes: the ratio is below 2, as with the exact denoiser.
  """
  denoise, _ = network
  c, x_T = conditions_and_noise()
  total_variance = posterior_total_variance()
  mean_error = squared_errors_to_truth(per_condition(denoise(x_T, jnp.full_like(c, T - 1), c)))
  np.testing.assert_allclose(mean_error, total_variance, rtol=0.05)
  sample_error = squared_errors_to_truth(per_condition(sample(denoise, c, x_T, 100)))
  np.testing.assert_allclose(sample_error, 2 * total_variance, rtol=0.07)
  assert sample_error.sum() / mean_error.sum() == pytest.approx(2.0, abs=0.1)
  ratio_10 = squared_errors_to_truth(per_condition(sample(denoise, c, x_T, 10))).sum() / (
      mean_error.sum()
  )
  exact_ratio_10 = squared_errors_to_truth(exact_samples(10)).sum() / total_variance.sum()
  assert ratio_10 == pytest.approx(exact_ratio_10, abs=0.1)
  assert ratio_10 < 1.95
