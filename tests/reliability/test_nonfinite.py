"""Issue 13: NaN injected into a batch.

By default training stops with an error naming the step, keeping the last good checkpoint;
with config.train.skip_nonfinite=True the update is dropped, counted and training goes on.
"""

import functools
import logging

import jax
import numpy as np
import pytest

from diffhand_jax import checkpointing
from diffhand_jax import logging_utils
from diffhand_jax import optim
from diffhand_jax import parallel
from configs import synthetic
from diffhand_jax import train
from diffhand_jax import train_step as train_step_lib
import helpers


def six_step_config(**overrides):
  config = helpers.tiny_config(**overrides)
  config.train.num_steps = 6
  return config


def assert_finite(tree):
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('parallelism', parallel.PARALLELISMS)
def test_nan_batch_stops_naming_the_step(tmp_path, parallelism):
  config = six_step_config(checkpoint_every=1, parallelism=parallelism)
  workdir = str(tmp_path / 'run')
  with pytest.raises(
      FloatingPointError, match=r'non-finite loss \(nan\) in train step 3 .*checkpoint: step 3'
  ):
    train.run_training(config, workdir, helpers.tiny_task(config, nan_at=3))
  # The state after the NaN update (step 4) was never written; step 3 is intact.
  assert checkpointing.latest_step(workdir) == 3
  assert_finite(checkpointing.restore_params(workdir))


def reference_with_step_skipped(config, skipped_step):
  """The same updates as run_training, with `skipped_step` leaving the state unchanged
  (its `step` counter alone advances): a naive loop over the unwrapped train step."""
  num_steps = int(config.train.num_steps)
  optimizer = optim.make_optimizer(config.optim, num_steps)
  schedule = optim.learning_rate_schedule(config.optim, num_steps)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  ema_decay = float(config.optim.ema_decay)
  state = train_step_lib.create_train_state(
      helpers.tiny_init(init_rng), optimizer, state_rng, ema_decay
  )
  step_fn = jax.jit(
      functools.partial(
          train_step_lib.train_step,
          loss_fn=helpers.tiny_loss,
          optimizer=optimizer,
          schedule=schedule,
          ema_decay=ema_decay,
      )
  )
  for step in range(num_steps):
    if step == skipped_step:
      state = state.replace(step=state.step + 1)
      continue
    batch = helpers.tiny_batch(config.seed, step, config.train.global_batch_size)
    state, _ = step_fn(state, batch)
  return jax.device_get(state)


def test_skip_nonfinite_drops_the_update_counts_it_and_trains_on(tmp_path, caplog):
  config = six_step_config(skip_nonfinite=True)
  workdir = str(tmp_path / 'run')
  with caplog.at_level(logging.WARNING):
    final = train.run_training(config, workdir, helpers.tiny_task(config, nan_at=3))
  final = jax.device_get(final)
  assert int(final.step) == 6
  warnings = [r.getMessage() for r in caplog.records if 'non-finite update' in r.getMessage()]
  assert len(warnings) == 1 and 'train step 3' in warnings[0] and '1 skipped' in warnings[0]
  expected = reference_with_step_skipped(config, skipped_step=3)
  for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # The reference really differs from a run that trained on step 3 (with a finite batch).
  straight = jax.device_get(
      train.run_training(config, str(tmp_path / 'b'), helpers.tiny_task(config))
  )
  assert not np.allclose(straight.params['w1'], final.params['w1'])
  # The count is logged, and the checkpoints are finite and restore.
  records = logging_utils.read_scalars(workdir, 'train')
  assert [r['skipped'] for r in records] == [0, 0, 0, 1, 1, 1]
  assert checkpointing.latest_step(workdir) == 6
  assert_finite(checkpointing.restore_params(workdir))


def test_skip_nonfinite_drops_an_overflowing_update(tmp_path):
  """A finite loss with an update that overflows the params (lr 1e38) is dropped as well:
  every update is, and the params stay at their initial values."""
  config = helpers.tiny_config(checkpoint_every=1, skip_nonfinite=True)
  config.optim.warmup_steps = 0
  config.optim.learning_rate = 1e38
  config.optim.grad_clip_norm = 0.0
  workdir = str(tmp_path / 'run')
  final = jax.device_get(train.run_training(config, workdir, helpers.tiny_task(config)))
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  for got, want in zip(jax.tree.leaves(final.params), jax.tree.leaves(helpers.tiny_init(init_rng))):
    np.testing.assert_array_equal(got, want)
  assert int(final.step) == 4
  assert [r['skipped'] for r in logging_utils.read_scalars(workdir, 'train')] == [1, 2, 3, 4]
  assert_finite(checkpointing.restore_params(workdir))


def test_skip_nonfinite_is_off_by_default():
  assert synthetic.get_config().train.skip_nonfinite is False
  assert synthetic.get_config('smoke').train.skip_nonfinite is False
