"""Tests of the FreiHAND numpy reader on a tiny directory in the official layout."""

import json

import numpy as np
from PIL import Image
import pytest

from datasets import freihand
from datasets.freihand import testing

NUM_TRAIN, NUM_EVAL, SIZE = 3, 2, 32


@pytest.fixture(scope='module')
def layout(tmp_path_factory):
  root = tmp_path_factory.mktemp('freihand')
  return root, testing.write_layout(root, NUM_TRAIN, NUM_EVAL, image_size=SIZE)


def _copy_layout(tmp_path, **kwargs):
  root = tmp_path / 'fh'
  return root, testing.write_layout(root, NUM_TRAIN, NUM_EVAL, image_size=SIZE, **kwargs)


def test_training_ids_map_to_annotations_and_images(layout):
  root, written = layout
  train = written['training']
  examples = list(freihand.examples(root, 'training'))
  assert len(examples) == 4 * NUM_TRAIN
  for position, example in enumerate(examples):
    image_id = example['image_id']
    assert image_id == position  # version-major, the official file order
    idx = image_id % NUM_TRAIN
    assert example['version'] == freihand.VERSIONS[image_id // NUM_TRAIN]
    assert example['id'] == image_id
    np.testing.assert_array_equal(example['K'], train['K'][idx])
    np.testing.assert_array_equal(example['joints3d'], train['xyz'][idx])
    np.testing.assert_array_equal(example['verts'], train['verts'][idx])
    np.testing.assert_array_equal(example['pose'], train['mano'][idx, 0, :48])
    np.testing.assert_array_equal(example['betas'], train['mano'][idx, 0, 48:58])
    assert example['scale'] == pytest.approx(float(train['scale'][idx]))
    # The image is the file of this id: its uniform colour says which.
    assert example['image'].shape == (SIZE, SIZE, 3) and example['image'].dtype == np.uint8
    mean_colour = example['image'].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(mean_colour, testing.image_colour(image_id), atol=3)
    assert example['mask'].shape == (SIZE, SIZE, 1)
    assert set(np.unique(example['mask'])) == {0, 255}
    assert example['is_right'] is True and example['has_targets'] is True


def test_joints2d_is_the_projection_in_pixels(layout):
  root, written = layout
  example = next(freihand.examples(root, 'training', versions=['hom']))
  assert example['image_id'] == NUM_TRAIN  # first 'hom' image: idx 0
  K, xyz = written['training']['K'][0], written['training']['xyz'][0]
  for j in range(21):  # naive per-joint loop
    u = K[0, 0] * xyz[j, 0] / xyz[j, 2] + K[0, 2]
    v = K[1, 1] * xyz[j, 1] / xyz[j, 2] + K[1, 2]
    np.testing.assert_allclose(example['joints2d'][j], [u, v], rtol=1e-5)
  assert example['joints2d'].dtype == np.float32
  # Metres, in front of the camera: hands are tens of centimetres away.
  assert 0.3 < example['joints3d'][:, 2].mean() < 0.7


def test_evaluation_with_and_without_annotations(layout, tmp_path):
  root, written = layout
  examples = list(freihand.examples(root, 'evaluation'))
  assert [e['image_id'] for e in examples] == list(range(NUM_EVAL))
  assert all(e['has_targets'] and e['version'] == 'gs' for e in examples)
  np.testing.assert_array_equal(examples[1]['verts'], written['evaluation']['verts'][1])
  bare_root, _ = _copy_layout(tmp_path, eval_annotations=False)
  bare = list(freihand.examples(bare_root, 'evaluation'))
  assert len(bare) == NUM_EVAL
  for example in bare:
    assert not example['has_targets']
    assert {'image', 'K', 'scale'} <= set(example)
    assert not {'joints3d', 'joints2d', 'verts', 'pose', 'betas', 'mask'} & set(example)
  with pytest.raises(ValueError, match='gs'):
    list(freihand.examples(root, 'evaluation', versions=['hom']))


def test_missing_image_names_the_file(tmp_path):
  root, _ = _copy_layout(tmp_path)
  (root / 'training' / 'rgb' / '00000007.jpg').unlink()
  with pytest.raises(FileNotFoundError, match='00000007.jpg'):
    list(freihand.examples(root, 'training'))
  (root / 'training_verts.json').unlink()
  with pytest.raises(FileNotFoundError, match='training_verts.json'):
    list(freihand.examples(root, 'training'))


def test_truncated_jpeg_raises_or_is_skipped_and_counted(tmp_path):
  root, _ = _copy_layout(tmp_path)
  path = root / 'training' / 'rgb' / '00000004.jpg'
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(freihand.CorruptFileError, match='00000004.jpg'):
    list(freihand.examples(root, 'training'))
  with pytest.warns(UserWarning, match='skipped 1 corrupt'):
    ids = [e['image_id'] for e in freihand.examples(root, 'training', skip_corrupt=True)]
  assert ids == [i for i in range(4 * NUM_TRAIN) if i != 4]


def test_wrong_length_json_names_file_and_expected_length(tmp_path):
  root, written = _copy_layout(tmp_path)
  with open(root / 'training_xyz.json', 'w') as f:
    json.dump(written['training']['xyz'][:2].tolist(), f)
  with pytest.raises(ValueError, match=r'training_xyz.json: 2 entries, expected 3'):
    next(freihand.examples(root, 'training'))


def test_wrong_entry_shape_and_nan_are_rejected(tmp_path):
  root, written = _copy_layout(tmp_path)
  with open(root / 'training_mano.json', 'w') as f:
    json.dump(written['training']['mano'][..., :60].tolist(), f)
  with pytest.raises(ValueError, match=r'training_mano.json: entries have shape \(60,\)'):
    next(freihand.examples(root, 'training'))
  xyz = written['training']['xyz'].copy()
  xyz[1, 2, 0] = np.nan
  text = json.dumps(xyz[:NUM_EVAL].tolist())  # json writes NaN as a bare NaN token
  (root / 'evaluation_xyz.json').write_text(text)
  with pytest.raises(ValueError, match='evaluation_xyz.json: contains NaN'):
    next(freihand.examples(root, 'evaluation'))


def test_depth_png_millimetres_and_npy_metres(tmp_path):
  root, _ = _copy_layout(tmp_path)
  depth_dir = tmp_path / 'depth'
  (depth_dir / 'evaluation' / 'rgb').mkdir(parents=True)
  millimetres = np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) + 400
  Image.fromarray(millimetres).save(depth_dir / 'evaluation' / 'rgb' / '00000000.png')
  metres = np.full((SIZE, SIZE), 0.55, np.float32)
  np.save(depth_dir / 'evaluation' / 'rgb' / '00000001.npy', metres)
  first, second = freihand.examples(root, 'evaluation', depth_dir=depth_dir)
  assert first['depth'].shape == (SIZE, SIZE, 1) and first['depth'].dtype == np.float32
  np.testing.assert_allclose(first['depth'][..., 0], millimetres / 1000.0, rtol=1e-6)
  np.testing.assert_allclose(second['depth'][..., 0], metres)
  np.save(depth_dir / 'evaluation' / 'rgb' / '00000001.npy', metres[:5])
  with pytest.raises(ValueError, match='00000001.npy: depth shape'):
    list(freihand.examples(root, 'evaluation', depth_dir=depth_dir))
  (depth_dir / 'evaluation' / 'rgb' / '00000001.npy').unlink()
  with pytest.raises(FileNotFoundError, match='00000001'):
    list(freihand.examples(root, 'evaluation', depth_dir=depth_dir))


def test_bad_root_and_split(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    next(freihand.examples(tmp_path / 'nowhere', 'training'))
  with pytest.raises(ValueError, match='unknown FreiHAND split'):
    next(freihand.examples(tmp_path, 'test'))
