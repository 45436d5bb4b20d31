"""HO-3D v2 reader and submission writer on a tiny directory in the official layout."""

import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from datasets import ho3d
from datasets.ho3d import testing
from diffhand_jax import mano
from diffhand_jax import procedural_mano


@pytest.fixture(scope='module')
def layout(tmp_path_factory):
  root = tmp_path_factory.mktemp('ho3d')
  mano_dir = tmp_path_factory.mktemp('mano')
  mano.save_mano(procedural_mano.procedural_hand(0), mano_dir / 'MANO_RIGHT.pkl')
  return root, mano_dir, testing.write_layout(root)


def test_joint_maps_written_out():
  # FreiHAND order: wrist, thumb 1-4, index 1-4, middle, ring, pinky. HO-3D (MANO) order:
  # wrist 0, index 1-3, middle 4-6, pinky 7-9, ring 10-12, thumb 13-15, tips 16-20 (thumb,
  # index, middle, ring, pinky).
  assert ho3d.HO3D_TO_FREIHAND[1:5] == (13, 14, 15, 16)  # thumb joints, then its tip
  assert ho3d.HO3D_TO_FREIHAND[5:9] == (1, 2, 3, 17)  # index, index tip
  assert ho3d.HO3D_TO_FREIHAND[17:21] == (7, 8, 9, 20)  # pinky, pinky tip
  assert ho3d.FREIHAND_TO_HO3D[13] == 1 and ho3d.FREIHAND_TO_HO3D[20] == 20
  assert ho3d.FREIHAND_TO_HO3D[7] == 17 and ho3d.FREIHAND_TO_HO3D[16] == 4
  for k, j in enumerate(ho3d.HO3D_TO_FREIHAND):
    assert ho3d.FREIHAND_TO_HO3D[j] == k


def test_training_example_flips_and_reorders(layout):
  root, mano_dir, metas = layout
  train = list(ho3d.examples(root, 'train', mano_dir=mano_dir))
  # 4 frames listed, MC1/0001 unannotated: skipped, its id (3) consumed.
  assert [e['id'] for e in train] == [0, 1, 2]
  example = train[1]
  meta = metas['train']['ABF10/0001']
  gl = meta['handJoints3D']
  # Hand-computed: FreiHAND joint 1 (thumb base) = HO-3D joint 13 with y and z negated.
  np.testing.assert_array_equal(example['joints3d'][1], [gl[13, 0], -gl[13, 1], -gl[13, 2]])
  np.testing.assert_array_equal(example['joints3d'][8], [gl[17, 0], -gl[17, 1], -gl[17, 2]])
  np.testing.assert_array_equal(example['joints3d'][0], [gl[0, 0], -gl[0, 1], -gl[0, 2]])
  assert np.all(example['joints3d'][:, 2] > 0)  # in front of an OpenCV camera
  u = 615.0 * example['joints3d'][4, 0] / example['joints3d'][4, 2] + 16
  assert example['joints2d'][4, 0] == pytest.approx(u, rel=1e-5)
  assert example['is_right'] and example['has_targets']
  # Vertices: MANO with the full pose (flat_hand_mean=True) + handTrans, then the flip.
  model = procedural_mano.procedural_hand(0)
  verts, _ = mano.mano_forward(
      model,
      meta['handPose'][None],
      meta['handBeta'][None],
      meta['handTrans'][None],
      flat_hand_mean=True,
  )
  np.testing.assert_allclose(example['verts'], np.asarray(verts[0]) * [1, -1, -1], atol=1e-6)
  np.testing.assert_allclose(
      example['pose'][3:] + np.asarray(model.hands_mean), meta['handPose'][3:], atol=1e-6
  )


def test_evaluation_examples_carry_box_and_root(layout):
  root, mano_dir, metas = layout
  evaluation = list(ho3d.examples(root, 'evaluation', mano_dir=mano_dir))
  assert [e['id'] for e in evaluation] == [0, 1, 2]
  e = evaluation[2]
  assert not e['has_targets'] and 'joints3d' not in e
  np.testing.assert_array_equal(e['bbox'], [6, 3, 22, 18])
  np.testing.assert_allclose(e['root'], [0.02, -0.02, 0.45])
  assert e['image'].shape == (24, 32, 3) and tuple(e['image'][0, 0]) == (200, 20, 30)


def test_submission_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  joints = rng.normal(0, 0.03, (2, 21, 3)) + [0, 0, 0.5]
  verts = rng.normal(0, 0.03, (2, 778, 3)) + [0, 0, 0.5]
  path = ho3d.write_submission(tmp_path / 'pred.zip', joints, verts, expected_count=2)
  with zipfile.ZipFile(path) as archive:
    assert archive.namelist() == ['pred.json']
    xyz, mesh = json.loads(archive.read('pred.json'))
  xyz, mesh = np.asarray(xyz), np.asarray(mesh)
  assert xyz.shape == (2, 21, 3) and mesh.shape == (2, 778, 3)
  # Hand-computed: HO-3D joint 13 (thumb base) = our FreiHAND joint 1, y and z negated.
  np.testing.assert_allclose(xyz[1, 13], joints[1, 1] * [1, -1, -1], atol=1e-6)
  np.testing.assert_allclose(xyz[0, 16], joints[0, 4] * [1, -1, -1], atol=1e-6)  # thumb tip
  np.testing.assert_allclose(mesh[1, 5], verts[1, 5] * [1, -1, -1], atol=1e-6)
  assert np.all(xyz[..., 2] < 0)
  with pytest.raises(ValueError, match='evaluation split has 3'):
    ho3d.write_submission(tmp_path / 'p.zip', joints, verts, expected_count=3)
  with pytest.raises(ValueError, match='OpenCV'):
    ho3d.write_submission(tmp_path / 'p.zip', joints * [1, 1, -1], verts)


class _Evil:

  def __reduce__(self):
    return (os.system, ('echo pwned',))


def test_meta_pickles_are_read_without_running_code(tmp_path):
  path = tmp_path / 'evil.pkl'
  with open(path, 'wb') as f:
    pickle.dump({'handPose': _Evil()}, f, protocol=2)
  with pytest.raises(ValueError, match='refusing'):
    ho3d.reader.read_meta(path)


def test_missing_list_and_bad_split(tmp_path):
  with pytest.raises(FileNotFoundError, match='train.txt'):
    ho3d.frame_list(tmp_path, 'train')
  with pytest.raises(ValueError, match='split'):
    ho3d.frame_list(tmp_path, 'val')


def test_depth_dir_mirrors_the_rgb_paths(layout, tmp_path):
  root, mano_dir, _ = layout
  depth = np.full((24, 32), 0.5, np.float32)
  for sequence in ('ABF10', 'MC1'):
    (tmp_path / 'train' / sequence / 'rgb').mkdir(parents=True)
    for frame in ('0000', '0001'):
      np.save(tmp_path / 'train' / sequence / 'rgb' / f'{frame}.npy', depth)
  example = next(ho3d.examples(root, 'train', mano_dir=mano_dir, depth_dir=tmp_path))
  assert example['depth'].shape == (24, 32, 1) and np.all(example['depth'] == 0.5)
  with pytest.raises(FileNotFoundError, match='depth map missing'):
    next(ho3d.examples(root, 'evaluation', mano_dir=mano_dir, depth_dir=tmp_path))
