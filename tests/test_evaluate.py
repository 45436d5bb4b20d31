"""--mode=eval and --mode=predict on 4 fake devices, from a checkpoint saved on 2.

The data are tiny FreiHAND-layout folders (`datasets.freihand.testing`): one with evaluation
annotations, one without (the official evaluation split without its annotation files).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import synthetic
from datasets.freihand import testing
from diffhand_jax import checkpointing
from diffhand_jax import evaluate
from diffhand_jax import models
from diffhand_jax import optim
from diffhand_jax import parallel
from diffhand_jax import predict
from diffhand_jax import train_step as train_step_lib

NUM_EVAL = 3
TRAIN_DEVICES = 2


def freihand_config(root, *, eval_annotations):
  """The smoke config on a FreiHAND-layout folder written under `root`."""
  testing.write_layout(
      root / 'files',
      num_train=1,
      num_eval=NUM_EVAL,
      image_size=48,
      eval_annotations=eval_annotations,
  )
  config = synthetic.get_config('smoke')
  config.data.name = 'freihand'
  config.data.root = str(root / 'files')
  config.data.tfds_data_dir = str(root / 'tfds')
  return config


def save_checkpoint_on(devices, config, workdir, step=4):
  """Saves a fresh smoke model's train state as a jit run over `devices` holds it."""
  model = models.build_model(config)
  size = config.data.image_size
  params = models.init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  state = train_step_lib.create_train_state(
      params, optim.make_optimizer(config.optim, config.train.num_steps), jax.random.PRNGKey(1), 0.0
  )
  placed = parallel.replicate(state, parallel.make_data_mesh(devices))
  with checkpointing.make_manager(workdir) as manager:
    checkpointing.save(manager, step, placed, config)
    manager.wait_until_finished()
  return jax.device_get(params)


@pytest.fixture(scope='module')
def labelled(tmp_path_factory):
  root = tmp_path_factory.mktemp('labelled')
  config = freihand_config(root, eval_annotations=True)
  workdir = str(root / 'run')
  params = save_checkpoint_on(jax.devices()[:TRAIN_DEVICES], config, workdir)
  return config, workdir, params


def test_the_suite_has_four_devices():
  assert jax.device_count() == 4  # tests/conftest.py; the tests below rely on it


@pytest.mark.slow
def test_eval_of_a_checkpoint_from_another_topology(labelled, capsys, caplog):
  config, workdir, params = labelled
  assert jax.device_count() != TRAIN_DEVICES
  scores = evaluate.evaluate_checkpoint(config, workdir)
  assert 'read only' not in caplog.text  # orbax's notice about read-only managers is dropped
  assert scores['num_examples'] == NUM_EVAL and np.isfinite(scores['pa_mpjpe'])
  out = capsys.readouterr().out
  assert f'on {NUM_EVAL} examples' in out and 'PA joints' in out
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['step'] == 4 and metrics['num_sampling_steps'] == (
      config.sampling.num_sampling_steps
  )
  # Every evaluation reports the meshes' roughness beside the ground truth's (issue 36).
  assert metrics['roughness'] > 0 and metrics['roughness_gt'] > 0
  assert metrics['roughness_ratio'] == pytest.approx(metrics['roughness'] / metrics['roughness_gt'])
  with open(os.path.join(workdir, 'eval', 'pred.json')) as f:
    xyz, verts = json.load(f)
  assert np.shape(xyz) == (NUM_EVAL, 21, 3) and np.shape(verts) == (NUM_EVAL, 778, 3)
  # The same numbers as the parameters evaluated directly (one device, no checkpoint).
  direct = evaluate.evaluate(config, jax.device_put(params, jax.devices()[0]))
  for key in ('mpjpe', 'pa_mpvpe', 'f5'):
    np.testing.assert_allclose(direct[key], scores[key], rtol=1e-5)


@pytest.mark.slow
def test_predict_from_a_checkpoint_from_another_topology(labelled, tmp_path, caplog):
  config, workdir, _ = labelled
  Image.fromarray(np.full((40, 56, 3), 120, np.uint8)).save(tmp_path / 'hand.png')
  result = predict.predict(
      config, workdir, str(tmp_path / 'hand.png'), output_dir=str(tmp_path / 'out')
  )
  assert 'read only' not in caplog.text
  with open(result['written'][0]) as f:
    record = json.load(f)
  assert record['num_sampling_steps'] == config.sampling.num_sampling_steps
  assert np.all(np.isfinite(record['vertices_camera']))


@pytest.mark.slow
def test_eval_without_annotations_writes_predictions_and_no_scores(tmp_path, capsys):
  config = freihand_config(tmp_path, eval_annotations=False)
  workdir = str(tmp_path / 'run')
  save_checkpoint_on(jax.devices(), config, workdir)
  scores = evaluate.evaluate_checkpoint(config, workdir)
  assert scores == {}
  out = capsys.readouterr().out
  assert 'no ground truth' in out and 'not scored' in out and 'PA joints' not in out
  eval_dir = os.path.join(workdir, 'eval')
  assert sorted(os.listdir(eval_dir)) == ['metrics.json', 'pred.json']
  with open(os.path.join(eval_dir, 'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['scored'] is False and metrics['num_examples'] == NUM_EVAL
  assert 'mpjpe' not in metrics
  with open(os.path.join(eval_dir, 'pred.json')) as f:
    xyz, verts = json.load(f)
  assert np.shape(xyz) == (NUM_EVAL, 21, 3) and np.shape(verts) == (NUM_EVAL, 778, 3)


def test_score_predictions_reports_roughness_when_faces_are_given():
  from diffhand_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from diffhand_jax import procedural_mano  # pylint: disable=g-import-not-at-top

  hand = procedural_mano.procedural_hand(0)
  rng = np.random.default_rng(0)
  gt_verts = np.asarray(hand.v_template)[None] + rng.normal(size=(4, 778, 3)) * 1e-4
  verts = gt_verts + rng.normal(size=gt_verts.shape) * 0.002
  regressor = np.asarray(hand.J_regressor)
  joints = lambda v: np.concatenate([np.einsum('jn,bnd->bjd', regressor, v)] * 2, axis=1)[:, :21]
  predictions = {
      'index': np.arange(4),
      'verts': verts,
      'joints': joints(verts),
      'gt_verts': gt_verts,
      'gt_joints': joints(gt_verts),
  }
  assert 'roughness' not in evaluate.score_predictions(predictions)
  scores = evaluate.score_predictions(dict(predictions, faces=np.asarray(hand.faces)))
  expected = metrics_lib.roughness_scores(verts, gt_verts, hand.faces)
  for key in ('roughness', 'roughness_gt', 'roughness_ratio'):
    assert scores[key] == pytest.approx(expected[key])
  assert scores['roughness_ratio'] > 1  # 2 mm of noise on each vertex
