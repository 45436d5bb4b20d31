"""Tests for diffhand_jax/predict.py (--mode=predict) with a fresh tiny model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import synthetic
from diffhand_jax import checkpointing
from diffhand_jax import models
from diffhand_jax import optim
from diffhand_jax import predict
from diffhand_jax import procedural_mano
from diffhand_jax import train_step as train_step_lib

_GOOD = {'a_hand.png': (80, 96), 'b_hand.jpg': (64, 64)}  # name: (height, width)


def _read_obj(path):
  vertices, faces = [], []
  with open(path) as f:
    for line in f:
      parts = line.split()
      if parts and parts[0] == 'v':
        vertices.append([float(x) for x in parts[1:4]])
      elif parts and parts[0] == 'f':
        faces.append([int(x) - 1 for x in parts[1:4]])
  return np.array(vertices), np.array(faces)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A folder with 2 images, 1 corrupt image and 1 non-image; fresh smoke-model params."""
  root = tmp_path_factory.mktemp('predict')
  images_dir = root / 'images'
  images_dir.mkdir()
  rng = np.random.default_rng(0)
  for name, (height, width) in _GOOD.items():
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
        images_dir / name
    )
  (images_dir / 'c_corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG' * 10)
  (images_dir / 'notes.txt').write_text('not an image')
  config = synthetic.get_config('smoke')
  model = models.build_model(config)
  size = config.data.image_size
  params = models.init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  workdir = str(root / 'run')
  # A checkpoint as training writes it, so predict takes the restore path (no params given).
  state = train_step_lib.create_train_state(
      params, optim.make_optimizer(config.optim, config.train.num_steps), jax.random.PRNGKey(1), 0.0
  )
  with checkpointing.make_manager(workdir) as manager:
    checkpointing.save(manager, 4, state, config)
    manager.wait_until_finished()
  result = predict.predict(config, workdir, str(images_dir))
  return {
      'config': config,
      'params': params,
      'workdir': workdir,
      'images_dir': str(images_dir),
      'result': result,
  }


@pytest.mark.slow
def test_two_results_and_one_reported_skip(setup):
  result = setup['result']
  assert result['output_dir'] == os.path.join(setup['workdir'], 'predictions')
  assert [os.path.basename(p) for p in result['written']] == ['a_hand.json', 'b_hand.json']
  assert len(result['skipped']) == 1
  path, reason = result['skipped'][0]
  assert os.path.basename(path) == 'c_corrupt.jpg' and 'c_corrupt.jpg' in reason
  produced = sorted(os.listdir(result['output_dir']))
  assert produced == [
      'a_hand.json',
      'a_hand.obj',
      'a_hand_overlay.png',
      'b_hand.json',
      'b_hand.obj',
      'b_hand_overlay.png',
  ]


@pytest.mark.slow
def test_json_has_documented_keys_and_shapes(setup):
  config = setup['config']
  num_vertices = 778
  for name, (height, width) in _GOOD.items():
    stem = os.path.splitext(name)[0]
    with open(os.path.join(setup['result']['output_dir'], f'{stem}.json')) as f:
      record = json.load(f)
    assert set(record) == set(predict.JSON_KEYS)
    shapes = {
        'image_size': (2,),
        'intrinsics': (3, 3),
        'crop_intrinsics': (3, 3),
        'camera': (3,),
        'root': (3,),
        'joints': (21, 3),
        'vertices': (num_vertices, 3),
        'joints_camera': (21, 3),
        'vertices_camera': (num_vertices, 3),
        'vertex_std': (num_vertices,),
    }
    for key, shape in shapes.items():
      assert np.shape(record[key]) == shape, key
    assert record['image_size'] == [height, width]
    assert record['num_sampling_steps'] == config.sampling.num_sampling_steps
    assert record['noise_scale'] == config.sampling.noise_scale
    # The documented assumed camera: f = 500 px * min(H, W) / 224, centre ((W-1)/2, (H-1)/2).
    focal = 500.0 * min(height, width) / 224
    np.testing.assert_allclose(
        record['intrinsics'],
        [[focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1]],
        rtol=1e-6,
    )
    vertices = np.array(record['vertices'])
    root = np.array(record['root'])
    np.testing.assert_allclose(record['vertices_camera'], vertices + root, atol=1e-6)
    np.testing.assert_allclose(record['joints'][0], np.zeros(3), atol=1e-6)
    assert np.all(np.array(record['vertex_std']) >= 0)
    # Joints projected with the image's K, recomputed here.
    if record['joints2d'] is not None:
      joints_cam = np.array(record['joints_camera'])
      uvw = joints_cam @ np.array(record['intrinsics']).T
      np.testing.assert_allclose(record['joints2d'], uvw[:, :2] / uvw[:, 2:], rtol=1e-4)


@pytest.mark.slow
def test_obj_and_overlay_read_back(setup):
  faces = np.asarray(procedural_mano.load_hand_model(setup['config']).faces)
  for name, (height, width) in _GOOD.items():
    stem = os.path.join(setup['result']['output_dir'], os.path.splitext(name)[0])
    vertices, obj_faces = _read_obj(stem + '.obj')
    with open(stem + '.json') as f:
      record = json.load(f)
    np.testing.assert_allclose(vertices, record['vertices_camera'], rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(obj_faces, faces)
    with Image.open(stem + '_overlay.png') as overlay:
      assert overlay.size == (width, height) and overlay.mode == 'RGB'


@pytest.mark.slow
def test_rerun_refuses_without_overwrite(setup):
  json_path = os.path.join(setup['result']['output_dir'], 'a_hand.json')
  before = os.path.getmtime(json_path)
  with pytest.raises(FileExistsError, match='a_hand'):
    predict.predict(setup['config'], setup['workdir'], setup['images_dir'], params=setup['params'])
  assert os.path.getmtime(json_path) == before
  records = {}
  for path in setup['result']['written']:
    with open(path) as f:
      records[path] = json.load(f)
  # overwrite=True replaces them; the params passed in are the ones the checkpoint holds and
  # the noise is keyed by seed and batch, so the numbers come out the same.
  result = predict.predict(
      setup['config'], setup['workdir'], setup['images_dir'], params=setup['params'], overwrite=True
  )
  assert result['written'] == setup['result']['written'] and len(result['skipped']) == 1
  for path, before_record in records.items():
    with open(path) as f:
      after = json.load(f)
    np.testing.assert_allclose(
        after['vertices_camera'], before_record['vertices_camera'], rtol=1e-6, atol=1e-9
    )


def test_assumed_intrinsics():
  K = predict.assumed_intrinsics(480, 640, 500.0)
  np.testing.assert_allclose(
      K, [[500 * 480 / 224, 0, 319.5], [0, 500 * 480 / 224, 239.5], [0, 0, 1]], rtol=1e-6
  )


def test_bad_inputs(tmp_path):
  config = synthetic.get_config('smoke')
  with pytest.raises(FileNotFoundError, match='missing'):
    predict.predict(config, str(tmp_path), str(tmp_path / 'missing'), params={})
  (tmp_path / 'notes.txt').write_text('x')
  with pytest.raises(ValueError, match='no image files'):
    predict.predict(config, str(tmp_path), str(tmp_path), params={})
  with pytest.raises(ValueError, match='not an image'):
    predict.predict(config, str(tmp_path), str(tmp_path / 'notes.txt'), params={})
  (tmp_path / 'bad.png').write_bytes(b'garbage')
  with pytest.raises(ValueError, match='bad.png'):
    predict.read_image(str(tmp_path / 'bad.png'))


def test_no_checkpoint_is_a_clear_error(tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / 'x.png')
  with pytest.raises(FileNotFoundError, match='checkpoint'):
    predict.predict(synthetic.get_config('smoke'), str(tmp_path / 'empty_run'), str(images))
