"""No compiled train step holds a constant that grows with the model (issue 35).

The train step of each shipped config is lowered over abstract arguments (no weight allocated,
benchmarks/lowered_size.py) and its constants are measured in the StableHLO text.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import lowered_size

MAX_CONSTANT_BYTES = 1 << 20  # 1 MiB: the largest legitimate one is the joint regressor (65 kB)


def test_constant_bytes_measures_a_captured_array():
  captured = np.arange(300_000, dtype=np.float32)  # 1.2 MB captured from Python
  text = jax.jit(lambda x: x + captured).lower(jnp.zeros(300_000)).as_text()
  assert max(lowered_size.constant_bytes(text)) == captured.nbytes
  half = jax.jit(lambda x: x * 2).lower(jnp.zeros(3, jnp.bfloat16)).as_text()
  assert lowered_size.constant_bytes(half) == [2]  # one bf16 scalar


def _assert_small(name, encoder_size=None):
  config = lowered_size.CONFIGS[name]()
  config.model.pretrained_path = ''
  if encoder_size:
    config.model.encoder_size = encoder_size
  text, count = lowered_size.lowered_train_step(config)
  largest = max(lowered_size.constant_bytes(text))
  assert largest < MAX_CONSTANT_BYTES, f'{name}: a {largest / 1e6:.1f} MB constant in the step'
  return len(text), count


def test_synthetic_flat_state_step_has_no_parameter_sized_constant():
  # The flat layout's weight-decay mask used to be a [num_params] constant (17 MB here).
  size, count = _assert_small('synthetic')
  assert size < 4 * count  # well below the parameters' 4 bytes each


def test_paper_step_does_not_grow_with_the_encoder():
  small, small_count = _assert_small('freihand', 'tiny')
  large, large_count = _assert_small('freihand', 'large')
  assert large_count > 40 * small_count
  # Same graph, wider arrays: the text grows only with the number of layers (12 -> 24).
  assert large < 2.5 * small, (small, large)
  assert large < 16e6


@pytest.mark.slow
@pytest.mark.parametrize('name', ['freihand_depth', 'dexycb', 'ho3d'])
def test_every_shipped_config_step_has_small_constants(name):
  _assert_small(name)
