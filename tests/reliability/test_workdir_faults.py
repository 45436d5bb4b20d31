"""Issue 13: an unwritable workdir, a full disk and failed checkpoint saves.

Each fault must fail with an error naming the folder (and the step, for a save) before
training time is lost, the process must exit, and the checkpoints written before survive.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from diffhand_jax import checkpointing
from diffhand_jax import checkpoint_saver
from diffhand_jax import train
from orbax.checkpoint._src.path import async_path
import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def never_iterated(start_step):
  raise AssertionError(f'training started (data asked for at step {start_step})')


def counting_task(config, seen):
  """The tiny task; `seen` gets every step index whose batch was taken."""

  def batches(start):
    for index, batch in enumerate(helpers.tiny_iterator(config, start)):
      seen.append(start + index)
      yield batch

  return helpers.tiny_task(config)._replace(train_iterator=batches)


def test_checkpoint_folder_that_is_a_file_fails_before_training(tmp_path):
  config = helpers.tiny_config()
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'checkpoints').write_text('not a folder')
  task = helpers.tiny_task(config)._replace(train_iterator=never_iterated)
  with pytest.raises(checkpointing.WorkdirError, match=f'cannot write to {workdir}/checkpoints'):
    train.run_training(config, str(workdir), task)
  assert (workdir / 'checkpoints').read_text() == 'not a folder'  # left as it was


def test_workdir_below_a_file_fails_before_training(tmp_path):
  config = helpers.tiny_config()
  (tmp_path / 'file').write_text('')
  workdir = tmp_path / 'file' / 'run'
  task = helpers.tiny_task(config)._replace(train_iterator=never_iterated)
  with pytest.raises(checkpointing.WorkdirError, match=f'cannot write to {workdir}'):
    train.run_training(config, str(workdir), task)


def test_full_disk_fails_before_training_naming_the_folder(tmp_path, monkeypatch):
  config = helpers.tiny_config()
  workdir = tmp_path / 'run'
  free = 5 << 20
  monkeypatch.setattr(
      checkpointing.shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(free, 0, free)
  )
  task = helpers.tiny_task(config)._replace(train_iterator=never_iterated)
  with pytest.raises(
      checkpointing.WorkdirError,
      match=f'not enough free disk space in {workdir}/checkpoints: 5.0 MiB free',
  ):
    train.run_training(config, str(workdir), task)


def test_needed_space_counts_the_state(tmp_path, monkeypatch):
  state = {'w': np.zeros((1024, 1024), np.float32)}  # 4 MiB
  assert checkpointing.tree_nbytes(state) == 4 << 20
  free = checkpointing.MIN_FREE_BYTES + (6 << 20)
  monkeypatch.setattr(
      checkpointing.shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(free, 0, free)
  )
  checkpointing.check_writable(str(tmp_path / 'a'), checkpointing.tree_nbytes(state))
  with pytest.raises(checkpointing.WorkdirError, match='two checkpoints of 8.0 MiB'):
    checkpointing.check_writable(str(tmp_path / 'b'), 2 * checkpointing.tree_nbytes(state))


def test_background_save_failure_stops_training_at_once(tmp_path, monkeypatch):
  """The save of step 2 fails in orbax's background thread (its final rename): training
  stops naming the step within a few steps, not at the next save (the last step, 200)."""
  workdir = tmp_path / 'run'
  first = helpers.tiny_config(checkpoint_every=1)
  first.train.num_steps = 1
  first.optim.warmup_steps = 0
  train.run_training(first, str(workdir), helpers.tiny_task(first))  # checkpoint 1, written well
  original_rename = async_path.rename

  async def failing_rename(src, dst):
    if os.path.basename(os.fspath(dst)) == '2':
      raise PermissionError(13, 'Permission denied (injected)', os.fspath(dst))
    return await original_rename(src, dst)

  monkeypatch.setattr(async_path, 'rename', failing_rename)
  # The only save before the end: step 2 (an evaluation with metrics); the next is at 200.
  config = helpers.tiny_config(checkpoint_every=1000, eval_every=2, best_metric='', log_every=1000)
  config.train.num_steps = 200
  seen = []
  task = counting_task(config, seen)
  counted = task.train_iterator

  def slow(start):  # steps of ~20 ms give the background thread time to fail
    for batch in counted(start):
      time.sleep(0.02)
      yield batch

  task = task._replace(
      train_iterator=slow, evaluate=lambda params, step: {'err': 1.0} if step == 2 else {}
  )
  with pytest.raises(checkpoint_saver.CheckpointSaveError) as raised:
    train.run_training(config, str(workdir), task)
  message = str(raised.value)
  assert 'saving the checkpoint of step 2' in message, message
  assert f'{workdir}/checkpoints' in message and 'PermissionError' in message
  assert 'latest step 1' in message
  assert max(seen) < 150, max(seen)  # stopped long before the next save
  print('stopped after the batch of step', max(seen))
  monkeypatch.setattr(async_path, 'rename', original_rename)
  assert checkpointing.latest_step(str(workdir)) == 1
  params = checkpointing.restore_params(str(workdir))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


# ---- A checkpoint folder that turns read-only during training (separate process) ----
_READ_ONLY_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import helpers
    from diffhand_jax import checkpointing, train

    workdir, break_at = sys.argv[1], int(sys.argv[2])
    config = helpers.tiny_config(checkpoint_every=1)
    config.train.num_steps = 8

    def batches(start):
      for index, batch in enumerate(helpers.tiny_iterator(config, start)):
        if start + index == break_at:
          os.chmod(checkpointing.checkpoint_dir(workdir), 0o555)
        yield batch

    train.run_training(config, workdir, helpers.tiny_task(config)._replace(train_iterator=batches))
""")


def _without_root_override():
  """A command prefix under which chmod 555 makes a folder unwritable, or None."""
  if os.geteuid() != 0:
    return []
  setpriv = shutil.which('setpriv')
  if setpriv is None:
    return None
  # root without CAP_DAC_OVERRIDE (and friends) obeys file modes like anyone else.
  probe = subprocess.run(
      [setpriv, '--bounding-set=-dac_override,-dac_read_search,-fowner', '--', 'true'],
      check=False,
      capture_output=True,
  )
  if probe.returncode != 0:
    return None
  return [setpriv, '--bounding-set=-dac_override,-dac_read_search,-fowner', '--']


@pytest.mark.slow
@pytest.mark.parametrize('break_at', [0, 3])
def test_read_only_checkpoint_folder_exits_with_the_step_named(tmp_path, break_at):
  """Measured before the fix: break_at=0 hung for orbax's 20-minute signal timeout."""
  prefix = _without_root_override()
  if prefix is None:
    pytest.skip('running as root without setpriv: chmod cannot make a folder read-only')
  script = tmp_path / 'read_only.py'
  script.write_text(_READ_ONLY_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, 'tests')))
  workdir = tmp_path / 'run'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  start = time.monotonic()
  try:
    result = subprocess.run(
        prefix + [sys.executable, str(script), str(workdir), str(break_at)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
  finally:
    os.chmod(workdir / 'checkpoints', 0o755)
  elapsed = time.monotonic() - start
  output = result.stdout + result.stderr
  assert result.returncode != 0, output[-3000:]
  assert 'CheckpointSaveError: saving the checkpoint of step' in output, output[-3000:]
  assert f'{workdir}/checkpoints' in output
  assert 'step 8/8' not in output  # stopped, did not train on without checkpoints
  print(f'break_at={break_at}: exited {result.returncode} after {elapsed:.1f} s')
  # Whatever was complete before the folder turned read-only is intact and readable.
  kept = checkpointing.latest_step(str(workdir))
  if break_at == 0:
    assert kept is None
  else:
    assert kept is not None and 1 <= kept <= 3
    assert all(
        np.all(np.isfinite(x)) for x in jax.tree.leaves(checkpointing.restore_params(str(workdir)))
    )
