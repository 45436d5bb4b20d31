"""Issue 13: SIGKILL at random points of a training run, then the same command again.

Each rerun resumes from the last complete checkpoint (a partial one is never read) and the
run ends with the same parameters, EMA and optimiser state as an uninterrupted run.
"""

import signal
import time

import jax
import numpy as np
import pytest

from diffhand_jax import checkpointing
from diffhand_jax import train
import helpers

NUM_STEPS = 12
RUN = dict(checkpoint_every=1, keep_checkpoints=2)  # config.train of the killed runs


def run_config():
  config = helpers.tiny_config(**RUN)
  config.train.num_steps = NUM_STEPS
  return config


def kill_after_step(process, step, extra_delay):
  """SIGKILLs `process` `extra_delay` s after it logs `step`; returns its output."""
  lines = []
  for line in process.stdout:
    lines.append(line)
    if line.startswith(f'step {step}/{NUM_STEPS}'):
      time.sleep(extra_delay)
      process.send_signal(signal.SIGKILL)
      break
  process.wait(timeout=60)
  return ''.join(lines)


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_matches_an_uninterrupted_run(tmp_path):
  straight = jax.device_get(
      train.run_training(run_config(), str(tmp_path / 'straight'), helpers.tiny_task(run_config()))
  )
  script = helpers.tiny_training_script(tmp_path / 'train.py', NUM_STEPS, **RUN)
  workdir = tmp_path / 'killed'
  rng = np.random.default_rng(13)
  resumed_from = []
  kill_step = 0
  for _ in range(3):
    kill_step = int(rng.integers(kill_step + 1, kill_step + 4))
    process = helpers.start_script(script, workdir)
    output = kill_after_step(process, kill_step, float(rng.uniform(0.0, 0.15)))
    assert process.returncode == -signal.SIGKILL, output[-2000:]
    # What is on disk is complete: the latest checkpoint restores, whatever the kill hit.
    latest = checkpointing.latest_step(str(workdir))
    assert latest is not None and latest <= kill_step + 1
    with checkpointing.make_manager(str(workdir), read_only=True) as manager:
      assert int(checkpointing.restore_state(manager, latest)['step']) == latest
    resumed_from.append(latest)
  process = helpers.start_script(script, workdir)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0 and 'FINISHED' in output, output[-3000:]
  assert 'Unreadable checkpoint' not in output  # no partial checkpoint was ever read
  print('killed after steps with checkpoints', resumed_from)
  with checkpointing.make_manager(str(workdir), read_only=True) as manager:
    assert manager.latest_step() == NUM_STEPS
    final = checkpointing.restore_state(manager, NUM_STEPS)
  for name in ('params', 'ema_params'):
    for key, value in getattr(straight, name).items():
      np.testing.assert_array_equal(final[name][key], value, err_msg=f'{name}/{key}')
  np.testing.assert_array_equal(
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(final['opt_state'])]),
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(straight.opt_state)]),
  )
