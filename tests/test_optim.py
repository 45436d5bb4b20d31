"""Tests of diffhand_jax/optim.py: the bias-corrected EMA against the textbook form."""

import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax import optim


@pytest.mark.parametrize('decay', [0.5, 0.9, 0.9999])
def test_ema_equals_zero_started_ema_divided_by_its_bias(decay):
  rng = np.random.default_rng(0)
  sequence = rng.normal(size=(30, 4))
  # Textbook form in float64: m_k = d m_{k-1} + (1 - d) p_k from m_0 = 0, then m_k / (1 - d^k).
  biased = np.zeros(4)
  ema = {'w': jnp.full((4,), 123.0)}  # the value before the first update does not matter
  for k, params in enumerate(sequence, start=1):
    biased = decay * biased + (1 - decay) * params
    ema = optim.update_ema(ema, {'w': jnp.asarray(params, jnp.float32)}, decay, k)
    np.testing.assert_allclose(np.asarray(ema['w']), biased / (1 - decay**k), rtol=2e-4, atol=2e-5)


def test_ema_of_constant_params_is_the_params_from_the_first_step():
  params = {'w': jnp.asarray([1.0, -2.0, 3.0])}
  ema = {'w': jnp.zeros(3)}
  for k in range(1, 6):
    ema = optim.update_ema(ema, params, 0.9999, k)
    np.testing.assert_allclose(np.asarray(ema['w']), np.asarray(params['w']), rtol=1e-5)
