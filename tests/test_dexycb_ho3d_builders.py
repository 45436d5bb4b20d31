"""The `dexycb` and `ho3d` TFDS builders and their input-pipeline wiring, on tiny layouts."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import dexycb as dexycb_config
from datasets import dexycb as dexycb_reader
from datasets import ho3d as ho3d_reader
from datasets.dexycb import dexycb
from datasets.dexycb import testing as dexycb_testing
from datasets.ho3d import ho3d
from datasets.ho3d import testing as ho3d_testing
from diffhand_jax import input_pipeline
from diffhand_jax import mano
from diffhand_jax import procedural_mano


@pytest.fixture(scope='module')
def mano_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('mano')
  mano.save_mano(procedural_mano.procedural_hand(0), folder / 'MANO_RIGHT.pkl')
  mano.save_mano(procedural_mano.procedural_hand(1), folder / 'MANO_LEFT.pkl')
  return folder


@pytest.mark.slow
def test_dexycb_builder_and_pipeline(tmp_path, mano_dir):
  root = tmp_path / 'dexycb'
  dexycb_testing.write_layout(root, mano_dir)
  config = dexycb_config.get_config('smoke')
  config.data.update(root=str(root), tfds_data_dir=str(tmp_path / 'tfds'), image_size=32)
  config.mano_path = str(mano_dir / 'MANO_RIGHT.pkl')
  builder = input_pipeline.get_builder(config)
  assert isinstance(builder, dexycb.Dexycb)
  splits = builder.info.splits
  assert (
      splits['train'].num_examples,
      splits['validation'].num_examples,
      splits['evaluation'].num_examples,
  ) == (300, 16, 64)
  expected = {e['id']: e for e in dexycb_reader.examples(root, 'test', mano_dir=mano_dir)}
  for record in tfds.as_numpy(builder.as_dataset(split='evaluation')):
    reference = expected.pop(int(record['id']))
    for key in ('K', 'joints3d', 'joints2d', 'verts', 'pose', 'betas', 'bbox', 'mask'):
      np.testing.assert_array_equal(record[key], reference[key], err_msg=key)
    assert bool(record['is_right']) == reference['is_right']
  assert not expected
  batch = next(input_pipeline.create_train_iterator(config))
  assert batch['image'].shape == (8, 32, 32, 3)
  assert set(np.unique(batch['is_right'])) <= {0, 1}
  np.testing.assert_allclose(batch['joints3d'][:, 0], 0, atol=1e-6)


@pytest.mark.slow
def test_ho3d_builder_evaluation_crops_from_the_box(tmp_path, mano_dir):
  root = tmp_path / 'ho3d'
  ho3d_testing.write_layout(root)
  builder = ho3d.Ho3d(data_dir=str(tmp_path / 'tfds'), mano_dir=str(mano_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  assert builder.info.splits['train'].num_examples == 3
  assert builder.info.splits['evaluation'].num_examples == 3
  train = {e['id']: e for e in ho3d_reader.examples(root, 'train', mano_dir=mano_dir)}
  for record in tfds.as_numpy(builder.as_dataset(split='train')):
    reference = train.pop(int(record['id']))
    np.testing.assert_array_equal(record['joints3d'], reference['joints3d'])
    np.testing.assert_array_equal(record['verts'], reference['verts'])
    np.testing.assert_array_equal(record['image'], reference['image'])  # PNG: lossless
    assert record['has_targets']
  boxes = {}
  for record in tfds.as_numpy(builder.as_dataset(split='evaluation')):
    assert not record['has_targets'] and not record['verts'].any()
    boxes[int(record['id'])] = record['bbox']
  np.testing.assert_array_equal(boxes[2], [6, 3, 22, 18])


def test_evaluation_crop_follows_the_given_box():
  """No joints + a bbox: the crop is the box's square (side = margin x longer side)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  image = np.zeros((60, 80, 3), np.uint8)
  image[20:30, 40:60] = 255  # the hand box: x 40..60, y 20..30
  example = {
      'image': image,
      'K': np.diag([100.0, 100.0, 1.0]).astype(np.float32),
      'joints3d': np.zeros((21, 3), np.float32) + [0, 0, 1],
      'joints2d': np.zeros((21, 2), np.float32),
      'verts': np.zeros((778, 3), np.float32),
      'is_right': True,
      'id': 0,
      'has_targets': False,
      'bbox': np.array([40, 20, 60, 30], np.float32),
  }
  config = ml_collections.ConfigDict(
      dict(
          data=dict(crop_margin=1.0, flip=False, image_size=20),
          model=dict(use_depth=False),
      )
  )
  out = input_pipeline.transform_example({k: tf.constant(v) for k, v in example.items()}, config)
  crop = input_pipeline.denormalize_image(out['image'].numpy())
  # A 20x20 crop centred on (50, 25): the box fills the middle 10 rows, every column.
  assert crop[8:12, :].mean() > 200 and crop[:3].mean() < 30 and crop[-3:].mean() < 30


def test_real_datasets_need_the_real_mano_files(tmp_path):
  config = dexycb_config.get_config('smoke')
  config.data.tfds_data_dir = str(tmp_path)
  with pytest.raises(ValueError, match='mano_path'):
    input_pipeline.get_builder(config)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['dexycb', 'ho3d'])
def test_evaluate_reports_the_protocol_files(tmp_path, mano_dir, name):
  """--mode=eval wiring: DexYCB adds its metrics, HO-3D writes the zipped submission."""
  import importlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  from diffhand_jax import evaluate  # pylint: disable=g-import-not-at-top
  from diffhand_jax import models  # pylint: disable=g-import-not-at-top

  root = tmp_path / name
  if name == 'dexycb':
    dexycb_testing.write_layout(root, mano_dir)
  else:
    ho3d_testing.write_layout(root)
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.data.update(root=str(root), tfds_data_dir=str(tmp_path / 'tfds'))
  config.mano_path = str(mano_dir / 'MANO_RIGHT.pkl')
  config.eval.update(batch_size=8, num_examples=8, tta_angles=())
  model = models.build_model(config)
  size = config.data.image_size
  params = models.init_params(
      model, jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32)
  )
  scores = evaluate.evaluate(
      config, params, model=model, workdir=str(tmp_path / 'run'), write_predictions=True
  )
  out = tmp_path / 'run' / 'eval'
  if name == 'dexycb':
    assert scores['num_examples'] == 8
    for key in ('mpjpe', 'pa_mpjpe', 'mpvpe', 'pa_mpvpe'):
      assert np.isfinite(scores[f'dexycb_{key}'])
    assert json.loads((out / 'metrics.json').read_text())['dexycb_pa_mpjpe'] > 0
  else:
    with zipfile.ZipFile(out / 'pred_ho3d.zip') as archive:
      xyz, verts = json.loads(archive.read('pred.json'))
    assert np.asarray(xyz).shape == (3, 21, 3) and np.asarray(verts).shape == (3, 778, 3)
