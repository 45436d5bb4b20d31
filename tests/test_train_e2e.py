"""End to end through launch.py: train -> eval -> predict on the smoke config."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import launch


@pytest.mark.slow
def test_smoke_train_eval_predict(tmp_path):
  workdir = str(tmp_path / 'run')
  common = [
      '--config=configs/synthetic.py:smoke',
      f'--workdir={workdir}',
      f'--config.data.tfds_data_dir={tmp_path / "tfds"}',
      f'--compilation_cache={tmp_path / "xla"}',
      '--config.train.step_cache=True',  # a CPU tool, off by default: exercised here
  ]

  out = launch(*common, '--mode=train')
  # With the step cache on, the lowered train step is kept beside the compilation cache.
  (exported,) = os.listdir(tmp_path / 'xla' / 'exported')
  assert f'Train step traced and saved to {tmp_path / "xla" / "exported" / exported}' in out
  # Progress lines for each of the 4 steps, then the final evaluation.
  for step in range(1, 5):
    assert f'step {step}/4' in out
  assert 'steps/s' in out and 'ETA' in out and 'Evaluation at step 4' in out
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert steps[-1] == 4 and 2 in steps
  assert os.listdir(os.path.join(workdir, 'tensorboard', 'train'))
  assert os.listdir(os.path.join(workdir, 'tensorboard', 'eval'))
  with open(os.path.join(workdir, 'eval', 'step_4', 'metrics.json')) as f:
    assert np.isfinite(json.load(f)['pa_mpjpe'])

  # Re-running the finished command resumes at step 4: nothing left to do.
  out = launch(*common, '--mode=train')
  assert 'step 1/4' not in out

  # Evaluated on 4 devices, trained on 2: checkpoints restore across topologies and the
  # parameters follow the evaluation mesh.
  out = launch(*common, '--mode=eval', devices=4)
  eval_dir = os.path.join(workdir, 'eval')
  with open(os.path.join(eval_dir, 'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['num_examples'] == 16 and metrics['step'] == 4
  for key in ('mpjpe', 'pa_mpjpe', 'mpvpe', 'pa_mpvpe', 'f5', 'pa_f15'):
    assert np.isfinite(metrics[key])
  with open(os.path.join(eval_dir, 'pred.json')) as f:
    xyz, verts = json.load(f)
  assert np.asarray(xyz).shape == (16, 21, 3)
  assert np.asarray(verts).shape == (16, 778, 3)
  with open(os.path.join(eval_dir, 'scores.txt')) as f:
    assert f.read().startswith('xyz_mean3d: ')
  assert 'PA joints' in out  # the printed table
  assert 'read only' not in out  # orbax's read-only notice is dropped

  images = tmp_path / 'images'
  images.mkdir()
  rng = np.random.default_rng(0)
  for name in ('a.png', 'b.jpg'):
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), np.uint8)).save(images / name)
  out = launch(*common, '--mode=predict', f'--input={images}', devices=4)
  assert 'read only' not in out
  written = sorted(os.listdir(os.path.join(workdir, 'predictions')))
  for stem in ('a', 'b'):
    assert {f'{stem}.obj', f'{stem}.json', f'{stem}_overlay.png'} <= set(written)
