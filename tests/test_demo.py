"""The demo (`--mode=demo`, `make demo`): its pieces and one end-to-end run on the smoke config."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import synthetic
from diffhand_jax import demo
from diffhand_jax import logging_utils
from diffhand_jax import render
from helpers import launch


@pytest.mark.parametrize('factor', [2, 3])
def test_upscaled_intrinsics_follow_the_pixels(factor):
  """A point's projection moves to factor * u + (factor - 1) / 2 (pixel centres on integers)."""
  K = np.array([[120.0, 0.0, 31.5], [0.0, 110.0, 30.0], [0.0, 0.0, 1.0]])
  image = np.zeros((64, 64, 3), np.uint8)
  big, big_K = demo.upscaled(image, K, factor)
  assert big.shape == (64 * factor, 64 * factor, 3)
  points = np.array([[0.01, -0.02, 0.5], [0.03, 0.01, 0.4]])
  np.testing.assert_allclose(
      render.project_points(points, big_K),
      factor * render.project_points(points, K) + (factor - 1) / 2,
      rtol=1e-12,
  )


def test_unseen_seed_config_changes_only_the_seed():
  config = synthetic.get_config()
  unseen = demo.unseen_seed_config(config)
  assert unseen.seed == config.seed + demo.UNSEEN_SEED_OFFSET
  unseen.seed = config.seed
  assert unseen.to_dict() == config.to_dict()


@pytest.mark.slow
def test_smoke_demo_writes_its_outputs_and_reuses_the_model(tmp_path):
  workdir = str(tmp_path / 'demo')
  args = [
      '--config=configs/synthetic.py:smoke',
      f'--workdir={workdir}',
      f'--config.data.tfds_data_dir={tmp_path / "tfds"}',
      '--mode=demo',
  ]
  out = launch(*args, devices=1)
  assert 'step 4/4' in out and 'Evaluation at step' not in out  # no train-seed evaluation
  unseen = synthetic.get_config('smoke').seed + demo.UNSEEN_SEED_OFFSET
  assert f'hands of seed {unseen}' in out
  out_dir = os.path.join(workdir, demo.OUTPUT_SUBDIR)
  with open(os.path.join(out_dir, 'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['seed'] == unseen and metrics['checkpoint_step'] == 4
  for key in ('mpjpe', 'pa_mpjpe', 'onestep_mpjpe', 'aux_mpjpe', 'mean_hand_mpjpe'):
    assert np.isfinite(metrics[key]), key
  grid = np.asarray(Image.open(os.path.join(out_dir, 'predictions.png')))
  assert grid.shape == (8 * 2 * 64, 3 * 2 * 64, 3)
  assert len(os.listdir(os.path.join(out_dir, 'meshes'))) == 8
  assert os.path.getsize(os.path.join(out_dir, 'training_curve.png')) > 0
  assert [r['step'] for r in logging_utils.read_scalars(workdir, 'train')] == [1, 2, 3, 4]
  # A second run reuses the trained model and only evaluates again.
  out = launch(*args, devices=1)
  assert 'Reusing the trained model' in out and 'step 1/4' not in out
