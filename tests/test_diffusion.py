"""Tests of diffhand_jax/diffusion.py against closed forms and hand-written numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax import diffusion

T = 1000


def _numpy_alpha_bar(num_timesteps, s):
  """Unclipped closed form alpha_bar[t] = f(t+1) / f(0)."""
  f = lambda u: np.cos((u / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
  return f(np.arange(1, num_timesteps + 1)) / f(0)


def test_cosine_schedule_monotone_in_unit_interval_and_closed_form():
  schedule = diffusion.cosine_schedule(T, 0.008)
  alpha_bar = np.asarray(schedule.alphas_cumprod, np.float64)
  assert alpha_bar.shape == (T,)
  assert np.all(alpha_bar > 0) and np.all(alpha_bar < 1)
  assert np.all(np.diff(alpha_bar) < 0)
  betas = np.asarray(schedule.betas)
  assert np.all(betas > 0) and np.all(betas <= 0.999 + 1e-7)
  assert betas[-1] == pytest.approx(0.999)  # the last step is clipped
  # Where no beta is clipped, the cumulative product equals the closed form.
  reference = _numpy_alpha_bar(T, 0.008)
  np.testing.assert_allclose(alpha_bar[:-1], reference[:-1], rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(alpha_bar, np.cumprod(1 - betas), rtol=1e-5, atol=1e-12)


def test_schedule_rejects_bad_arguments():
  with pytest.raises(ValueError, match='num_timesteps'):
    diffusion.cosine_schedule(0)
  with pytest.raises(ValueError, match='cosine_s'):
    diffusion.cosine_schedule(10, float('nan'))


def test_q_sample_moments_monte_carlo():
  schedule = diffusion.cosine_schedule(T)
  num = 20000
  x0 = jnp.broadcast_to(jnp.array([0.7, -1.2, 0.1]), (num, 3))
  t = jnp.full((num,), 300, jnp.int32)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  x_t = np.asarray(diffusion.q_sample(schedule, x0, t, noise))
  alpha = _numpy_alpha_bar(T, 0.008)[300]
  # Standard errors: sqrt(var / num) ~ 0.006; 5 sigma.
  np.testing.assert_allclose(x_t.mean(0), np.sqrt(alpha) * np.array([0.7, -1.2, 0.1]), atol=0.03)
  np.testing.assert_allclose(x_t.var(0), np.full(3, 1 - alpha), rtol=0.05)


def test_q_sample_per_example_timesteps_and_shape_errors():
  schedule = diffusion.cosine_schedule(T)
  x0 = jnp.ones((2, 4, 3))
  noise = jnp.full((2, 4, 3), 2.0)
  x_t = diffusion.q_sample(schedule, x0, jnp.array([0, 999]), noise)
  alpha = np.asarray(schedule.alphas_cumprod)[[0, 999]]
  expected = np.sqrt(alpha) + 2 * np.sqrt(1 - alpha)
  np.testing.assert_allclose(x_t[:, 0, 0], expected, rtol=1e-6)
  with pytest.raises(ValueError, match='noise'):
    diffusion.q_sample(schedule, x0, jnp.array([0, 1]), jnp.ones((2, 4, 2)))
  with pytest.raises(ValueError, match=r't must have shape \[2\]'):
    diffusion.q_sample(schedule, x0, jnp.array([0, 1, 2]), noise)


def test_ddim_timesteps():
  for steps in (1, 2, 7, 10, 50, T):
    taus = diffusion.ddim_timesteps(T, steps)
    assert taus.shape == (steps,) and taus.dtype == np.int32
    assert taus[0] == T - 1 and taus.min() >= 0
    assert np.all(np.diff(taus) < 0)
    # Evenly spaced: gaps differ by at most one (integer rounding).
    if steps > 1:
      assert np.ptp(np.diff(taus)) <= 1
  np.testing.assert_array_equal(diffusion.ddim_timesteps(T, 10), np.arange(999, 0, -100))
  np.testing.assert_array_equal(diffusion.ddim_timesteps(T, T), np.arange(T - 1, -1, -1))
  for bad in (0, T + 1):
    with pytest.raises(ValueError, match='num_sampling_steps'):
      diffusion.ddim_timesteps(T, bad)


def test_ddim_step_matches_numpy_formula():
  schedule = diffusion.cosine_schedule(T)
  alpha_bar = np.asarray(schedule.alphas_cumprod, np.float64)
  rng = np.random.default_rng(0)
  x_t, x0_hat, noise = (rng.normal(size=(2, 5, 3)) for _ in range(3))
  t, t_next, eta = 700, 350, 0.7
  out = diffusion.ddim_step(
      schedule,
      jnp.asarray(x_t, jnp.float32),
      jnp.asarray(x0_hat, jnp.float32),
      jnp.array([t, t]),
      jnp.array([t_next, t_next]),
      eta,
      jnp.asarray(noise, jnp.float32),
  )
  a, a_next = alpha_bar[t], alpha_bar[t_next]
  eps = (x_t - np.sqrt(a) * x0_hat) / np.sqrt(1 - a)
  sigma = eta * np.sqrt((1 - a_next) / (1 - a)) * np.sqrt(1 - a / a_next)
  expected = np.sqrt(a_next) * x0_hat + np.sqrt(1 - a_next - sigma**2) * eps + sigma * noise
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
  # The final step (t_next = -1) returns x0_hat exactly, whatever eta.
  last = diffusion.ddim_step(
      schedule,
      jnp.asarray(x_t, jnp.float32),
      jnp.asarray(x0_hat, jnp.float32),
      99,
      -1,
      1.0,
      jnp.asarray(noise, jnp.float32),
  )
  np.testing.assert_array_equal(np.asarray(last), np.asarray(x0_hat, np.float32))


def _toy_denoiser(x_t, t):
  """A non-trivial x0 predictor that depends on x_t and t."""
  return 0.5 * jnp.tanh(x_t) + 0.01 * t[:, None, None].astype(jnp.float32) / T


@pytest.mark.parametrize('steps', [1, 3, 10])
@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_perfect_oracle_returns_x0(steps, eta):
  schedule = diffusion.cosine_schedule(T)
  x0 = jax.random.normal(jax.random.key(1), (3, 8, 3))
  seen_t = []

  def oracle(x_t, t):
    seen_t.append(t.shape)
    return x0

  x_T = jax.random.normal(jax.random.key(2), x0.shape)
  out = diffusion.ddim_sample(
      oracle, schedule, x_T, diffusion.ddim_timesteps(T, steps), eta, jax.random.key(3)
  )
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-6)
  assert seen_t == [(3,)]  # traced once (scan body), t is per example


def test_oracle_keeps_ddim_on_the_noise_path():
  """With an x0 oracle and eta = 0, every intermediate x_tau = q_sample(x0, tau, eps)."""
  schedule = diffusion.cosine_schedule(T)
  x0 = jax.random.normal(jax.random.key(1), (2, 8, 3))
  eps = jax.random.normal(jax.random.key(2), x0.shape)
  taus = diffusion.ddim_timesteps(T, 4)
  x_T = diffusion.q_sample(schedule, x0, jnp.full((2,), taus[0]), eps)
  x = x_T
  for tau, tau_next in zip(taus[:-1], taus[1:]):
    x = diffusion.ddim_step(schedule, x, x0, tau, tau_next, 0.0, jnp.zeros_like(x))
    expected = diffusion.q_sample(schedule, x0, jnp.full((2,), tau_next), eps)
    np.testing.assert_allclose(np.asarray(x), np.asarray(expected), atol=1e-4)


def test_eta_zero_is_deterministic_given_noise_and_eta_one_is_not():
  schedule = diffusion.cosine_schedule(T)
  x_T = jax.random.normal(jax.random.key(0), (2, 8, 3))
  taus = diffusion.ddim_timesteps(T, 5)
  run = lambda eta, key: np.asarray(
      diffusion.ddim_sample(_toy_denoiser, schedule, x_T, taus, eta, jax.random.key(key))
  )
  np.testing.assert_array_equal(run(0.0, 1), run(0.0, 2))
  assert not np.allclose(run(1.0, 1), run(1.0, 2))


def test_single_step_equals_direct_prediction():
  schedule = diffusion.cosine_schedule(T)
  x_T = jax.random.normal(jax.random.key(0), (2, 8, 3))
  out = diffusion.ddim_sample(
      _toy_denoiser, schedule, x_T, diffusion.ddim_timesteps(T, 1), 0.0, jax.random.key(1)
  )
  direct = _toy_denoiser(x_T, jnp.full((2,), T - 1, jnp.int32))
  np.testing.assert_allclose(np.asarray(out), np.asarray(direct), atol=1e-6)


def test_ddim_sample_matches_python_loop():
  schedule = diffusion.cosine_schedule(T)
  x = jax.random.normal(jax.random.key(0), (2, 8, 3))
  taus = diffusion.ddim_timesteps(T, 6)
  out = diffusion.ddim_sample(_toy_denoiser, schedule, x, taus, 0.0, jax.random.key(1))
  nexts = list(taus[1:]) + [-1]
  for tau, tau_next in zip(taus, nexts):
    x0_hat = _toy_denoiser(x, jnp.full((2,), tau, jnp.int32))
    x = diffusion.ddim_step(schedule, x, x0_hat, tau, tau_next, 0.0, jnp.zeros_like(x))
  np.testing.assert_allclose(np.asarray(out), np.asarray(x), atol=1e-5)


def _count_equations(jaxpr):
  """Equations including those inside sub-jaxprs (scan bodies, pjit, ...)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          count += _count_equations(getattr(inner, 'jaxpr', inner))
  return count


def test_ddim_sample_is_one_scan_flat_in_steps():
  schedule = diffusion.cosine_schedule(T)
  x_T = jnp.zeros((2, 8, 3))

  def jaxpr_for(steps):
    fn = lambda x, key: diffusion.ddim_sample(
        _toy_denoiser, schedule, x, diffusion.ddim_timesteps(T, steps), 0.0, key
    )
    return jax.make_jaxpr(fn)(x_T, jax.random.key(0)).jaxpr

  small, large = jaxpr_for(2), jaxpr_for(20)
  assert [e.primitive.name for e in small.eqns].count('scan') == 1
  assert _count_equations(small) == _count_equations(large)
