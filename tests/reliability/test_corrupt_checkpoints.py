"""Issue 13: a damaged latest checkpoint; training and evaluation fall back to the previous one.

Each damage below made training and `--mode=eval` stop before (measured: the array named in
the OCDBT database, or a pytree structure error when the metadata was missing).
"""

import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from diffhand_jax import checkpointing
from diffhand_jax import train
import helpers

# tensorstore's callbacks into an event loop orbax has closed, after a failed read: harmless.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _files(step_dir, pattern):
  found = glob.glob(os.path.join(step_dir, 'state', '**', pattern), recursive=True)
  assert found, f'no {pattern} under {step_dir}: the orbax layout changed'
  return found


def truncate_data(step_dir):
  for path in _files(step_dir, 'd/*'):
    with open(path, 'r+b') as f:
      f.truncate(10)


def garbage_data(step_dir):
  rng = np.random.default_rng(0)
  for path in _files(step_dir, 'd/*'):
    size = os.path.getsize(path)
    with open(path, 'wb') as f:
      f.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def truncate_manifest(step_dir):
  for path in _files(step_dir, 'manifest.ocdbt'):
    with open(path, 'r+b') as f:
      f.truncate(5)


def missing_metadata(step_dir):
  os.remove(os.path.join(step_dir, 'state', '_METADATA'))


def missing_state(step_dir):
  shutil.rmtree(os.path.join(step_dir, 'state'))


def emptied(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


DAMAGES = [truncate_data, garbage_data, truncate_manifest, missing_metadata, missing_state, emptied]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 4-step run with checkpoints 2 and 4, and an uninterrupted 6-step run to compare with."""
  base = tmp_path_factory.mktemp('base')
  config = helpers.tiny_config()
  train.run_training(config, str(base / 'run'), helpers.tiny_task(config))
  six = helpers.tiny_config()
  six.train.num_steps = 6
  straight = train.run_training(six, str(base / 'straight'), helpers.tiny_task(six))
  return str(base / 'run'), jax.device_get(straight)


def damaged_copy(trained, tmp_path, damage, steps=(4,)):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained[0], workdir)
  for step in steps:
    damage(os.path.join(checkpointing.checkpoint_dir(workdir), str(step)))
  return workdir


def warnings_text(caplog):
  return '\n'.join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.mark.parametrize('damage', DAMAGES, ids=lambda d: d.__name__)
def test_training_resumes_from_the_previous_good_checkpoint(trained, tmp_path, caplog, damage):
  workdir = damaged_copy(trained, tmp_path, damage)
  bad = os.path.join(checkpointing.checkpoint_dir(workdir), '4')
  config = helpers.tiny_config()
  config.train.num_steps = 6
  with caplog.at_level(logging.WARNING):
    resumed = train.run_training(config, workdir, helpers.tiny_task(config))
  text = warnings_text(caplog)
  assert f'Unreadable checkpoint {bad}:' in text, text
  assert f'Using the checkpoint of step 2 in {checkpointing.checkpoint_dir(workdir)}' in text
  # Resumed at step 2 and retrained 3..6: the same parameters as an uninterrupted run.
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed)), jax.tree.leaves(trained[1])):
    np.testing.assert_array_equal(a, b)
  # The damaged folder is kept (moved aside), and step 4 was written again, readable.
  assert os.path.isdir(os.path.join(workdir, checkpointing.UNREADABLE_DIR, '4'))
  assert checkpointing.latest_step(workdir) == 6
  with checkpointing.make_manager(workdir, read_only=True) as manager:
    assert 4 in manager.all_steps()
    assert int(checkpointing.restore_state(manager, 4)['step']) == 4


@pytest.mark.parametrize('damage', [truncate_data, missing_metadata], ids=lambda d: d.__name__)
def test_evaluation_uses_the_previous_good_checkpoint(trained, tmp_path, caplog, damage):
  workdir = damaged_copy(trained, tmp_path, damage)
  with caplog.at_level(logging.WARNING):
    step, params = checkpointing.restore_latest_params(workdir)
  assert step == 2
  assert 'Unreadable checkpoint' in warnings_text(caplog)
  assert f'{checkpointing.checkpoint_dir(workdir)}/4' in warnings_text(caplog)
  with checkpointing.make_manager(workdir, read_only=True) as manager:
    expected = checkpointing.restore_state(manager, 2)['ema_params']
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  # Evaluation reads only: the damaged checkpoint stays where it was.
  assert os.path.isdir(os.path.join(checkpointing.checkpoint_dir(workdir), '4'))
  assert not os.path.exists(os.path.join(workdir, checkpointing.UNREADABLE_DIR))


def test_no_readable_checkpoint_is_an_error_naming_the_folder(trained, tmp_path):
  workdir = damaged_copy(trained, tmp_path, truncate_data, steps=(2, 4))
  folder = checkpointing.checkpoint_dir(workdir)
  with pytest.raises(
      checkpointing.UnreadableCheckpointError, match=f'no readable checkpoint in {folder}: '
  ) as raised:
    checkpointing.restore_params(workdir)
  assert f'{folder}/4:' in str(raised.value) and f'{folder}/2:' in str(raised.value)
  config = helpers.tiny_config()
  with pytest.raises(checkpointing.UnreadableCheckpointError, match=f'in {folder}: '):
    train.run_training(config, workdir, helpers.tiny_task(config))
  # Training moved both aside, deleting nothing: the next run starts afresh and keeps them.
  assert sorted(os.listdir(os.path.join(workdir, checkpointing.UNREADABLE_DIR))) == ['2', '4']


def test_an_explicit_step_does_not_fall_back(trained, tmp_path):
  workdir = damaged_copy(trained, tmp_path, missing_metadata)
  with pytest.raises(FileNotFoundError, match='_METADATA'):
    checkpointing.restore_params(workdir, step=4)
