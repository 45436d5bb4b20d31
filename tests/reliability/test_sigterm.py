"""Issue 13: SIGTERM (preemption) of a training process, then the same command again.

The process saves a checkpoint of the step it has reached, says so, and exits 0 within a
bounded time; the rerun resumes from that step and ends where an uninterrupted run ends.
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
SIGTERM_AFTER_STEP = 5
EXIT_WITHIN_S = 60

# No periodic checkpoint before the end: the only one on disk is the one SIGTERM wrote.
RUN = dict(checkpoint_every=1000, keep_checkpoints=2)


def run_config():
  config = helpers.tiny_config(**RUN)
  config.train.num_steps = NUM_STEPS
  return config


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_0_and_the_rerun_resumes(tmp_path):
  script = helpers.tiny_training_script(tmp_path / 'train.py', NUM_STEPS, **RUN)
  workdir = tmp_path / 'run'
  process = helpers.start_script(script, workdir)
  lines = []
  for line in process.stdout:
    lines.append(line)
    if line.startswith(f'step {SIGTERM_AFTER_STEP}/{NUM_STEPS}'):
      break
  signalled = time.monotonic()
  process.send_signal(signal.SIGTERM)
  rest, _ = process.communicate(timeout=EXIT_WITHIN_S)
  elapsed = time.monotonic() - signalled
  output = ''.join(lines) + rest
  assert process.returncode == 0, output[-3000:]
  print(f'exit 0 {elapsed:.1f} s after SIGTERM')
  saved = checkpointing.latest_step(str(workdir))
  # The step reached when the signal was seen: at least the logged one, never the last.
  assert saved is not None and SIGTERM_AFTER_STEP <= saved < NUM_STEPS, output[-3000:]
  assert f'SIGTERM: saved a checkpoint at step {saved}' in output
  assert f'step {saved + 1}/{NUM_STEPS}' not in output  # it stopped there

  rerun = helpers.start_script(script, workdir)
  output, _ = rerun.communicate(timeout=300)
  assert rerun.returncode == 0 and 'FINISHED' in output, output[-3000:]
  assert f'step {saved}/{NUM_STEPS}' not in output and f'step {saved + 1}/{NUM_STEPS}' in output
  straight = jax.device_get(
      train.run_training(run_config(), str(tmp_path / 'straight'), helpers.tiny_task(run_config()))
  )
  with checkpointing.make_manager(str(workdir), read_only=True) as manager:
    final = checkpointing.restore_state(manager, NUM_STEPS)
  for key, value in straight.params.items():
    np.testing.assert_array_equal(final['params'][key], value, err_msg=key)
