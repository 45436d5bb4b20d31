"""DexYCB reader on a tiny directory in the official layout (datasets/dexycb/testing.py)."""

import numpy as np
import pytest

from datasets import dexycb
from datasets.dexycb import reader
from datasets.dexycb import testing
from diffhand_jax import mano
from diffhand_jax import procedural_mano


@pytest.fixture(scope='module')
def layout(tmp_path_factory):
  root = tmp_path_factory.mktemp('dexycb')
  mano_dir = tmp_path_factory.mktemp('mano')
  # Two different MANO-format models, so that using the wrong side's file shows.
  mano.save_mano(procedural_mano.procedural_hand(0), mano_dir / 'MANO_RIGHT.pkl')
  mano.save_mano(procedural_mano.procedural_hand(1), mano_dir / 'MANO_LEFT.pkl')
  written = testing.write_layout(root, mano_dir)
  return root, mano_dir, written


def test_s0_split_sizes_and_order(layout):
  root, mano_dir, _ = layout
  # 10 subjects x 5 sequences x 8 cameras x 1 frame; s0 keeps sequence 4 of each 5 for val
  # (subjects 1-2) and test (subjects 3-10).
  assert dexycb.num_frames(root, 'train') == 10 * 4 * 8
  assert dexycb.num_frames(root, 'val') == 2 * 1 * 8
  assert dexycb.num_frames(root, 'test') == 8 * 1 * 8
  # Unannotated: camera 1 of sequences 0 and 3 of every subject (both train sequences).
  assert dexycb.count_annotated(root, 'train') == 320 - 20
  test = list(dexycb.examples(root, 'test', mano_dir=mano_dir))
  assert [e['id'] for e in test] == list(range(64))
  first = test[0]['image_path']
  assert '20200820-subject-03/20200101_100004/836212060125/color_000000.jpg' in first
  assert '/839512060362/' in test[1]['image_path']  # camera before ... (1 frame per camera)
  assert '20200903-subject-04' in test[8]['image_path']


def test_train_ids_skip_unannotated_frames(layout):
  root, mano_dir, _ = layout
  ids = [e['id'] for e in dexycb.examples(root, 'train', mano_dir=mano_dir)]
  assert len(ids) == 300 and ids[:3] == [0, 2, 3]  # id 1 = subject 1, sequence 0, camera 1
  with pytest.raises(ValueError, match='not annotated'):
    list(dexycb.examples(root, 'train', mano_dir=mano_dir, skip_unannotated=False))


@pytest.mark.parametrize('split,index', [('test', 0), ('val', 9)])
def test_example_matches_the_label_files(layout, split, index):
  """Right (sequence 4 is even -> right) and, below, left hands: hand-computed expectations."""
  root, mano_dir, written = layout
  example = list(dexycb.examples(root, split, mano_dir=mano_dir))[index]
  key = (
      example['image_path']
      .split(str(root) + '/')[1]
      .replace('color_', 'labels_')
      .replace('.jpg', '.npz')
  )
  label = written[key]
  np.testing.assert_array_equal(example['joints3d'], label['joint_3d'][0])
  np.testing.assert_array_equal(example['joints2d'], label['joint_2d'][0])
  assert example['is_right'] == (label['side'] == 'right')
  assert example['image'].shape == (24, 32, 3) and example['mask'].shape == (24, 32, 1)
  assert set(np.unique(example['mask'])) == {0, 255} and example['mask'][0, 0, 0] == 0


def test_vertices_follow_the_toolkit_mano_layer_for_both_sides(layout):
  root, mano_dir, written = layout
  seen = set()
  for example in dexycb.examples(root, 'train', mano_dir=mano_dir):
    side = 'right' if example['is_right'] else 'left'
    if side in seen:
      continue
    seen.add(side)
    key = (
        example['image_path']
        .split(str(root) + '/')[1]
        .replace('color_', 'labels_')
        .replace('.jpg', '.npz')
    )
    pose_m = written[key]['pose_m'][0].astype(np.float64)
    model = mano.load_mano(str(mano_dir / f'MANO_{side.upper()}.pkl'))
    # manopth, flat_hand_mean=False, ncomps=45, use_pca=True: full pose = global | mean + c @ P.
    full = np.concatenate(
        [
            pose_m[:3],
            np.asarray(model.hands_mean) + pose_m[3:48] @ np.asarray(model.hands_components),
        ]
    )
    verts, _ = mano.mano_forward(
        model,
        full[None].astype(np.float32),
        np.asarray(written[key]['betas'], np.float32)[None],
        flat_hand_mean=True,
    )
    expected = np.asarray(verts[0]) + pose_m[48:51]
    np.testing.assert_allclose(example['verts'], expected, atol=1e-5)
    np.testing.assert_allclose(
        example['pose'][3:], full[3:] - np.asarray(model.hands_mean), atol=1e-5
    )
    # The other side's model gives a different hand: the file choice matters.
    other = reader.mano_vertices(
        mano_dir, 'left' if side == 'right' else 'right', pose_m, written[key]['betas']
    )[0]
    assert np.abs(other - example['verts']).max() > 1e-3
  assert seen == {'right', 'left'}


def test_intrinsics_and_bbox(layout):
  root, mano_dir, _ = layout
  example = next(dexycb.examples(root, 'test', mano_dir=mano_dir))
  K = reader.intrinsics(root, reader.SERIALS[0])
  np.testing.assert_array_equal(example['K'], K)
  assert K[0, 1] == 0 and K[2, 2] == 1 and 600 <= K[0, 0] <= 620
  box = reader.bounding_box(np.array([[10.0, 10.0], [20.0, 14.0]]), (480, 640))
  np.testing.assert_allclose(box, [7.5, 4.5, 22.5, 19.5])  # centre (15, 12), side 1.5 * 10


def test_unknown_setup_and_missing_mano(layout, tmp_path):
  root, _, _ = layout
  with pytest.raises(ValueError, match='setup'):
    list(dexycb.examples(root, 'train', setup='s1', mano_dir=tmp_path))
  with pytest.raises(FileNotFoundError, match='MANO_RIGHT.pkl'):
    next(dexycb.examples(root, 'test', mano_dir=tmp_path))


def test_metrics_root_aligned_and_procrustes():
  rng = np.random.default_rng(0)
  gt_j, gt_v = rng.normal(0, 0.05, (3, 21, 3)), rng.normal(0, 0.05, (3, 778, 3))
  # A global shift: zero after wrist alignment and after Procrustes.
  m = dexycb.dexycb_metrics(gt_j + 0.1, gt_v + 0.1, gt_j, gt_v)
  assert max(m.values()) < 1e-4  # mm (align_w_scale adds a tiny epsilon to the norms)
  # The predicted wrist 3 mm off along x, everything else exact: root alignment moves every
  # other joint (20 of 21) and every vertex by 3 mm.
  pred_j = gt_j.copy()
  pred_j[:, 0, 0] += 0.003
  m = dexycb.dexycb_metrics(pred_j, gt_v, gt_j, gt_v)
  assert m['mpjpe'] == pytest.approx(3.0 * 20 / 21)
  assert m['mpvpe'] == pytest.approx(3.0)
  assert m['pa_mpvpe'] < 1e-4


def test_depth_dir_mirrors_the_colour_paths(layout, tmp_path):
  root, mano_dir, _ = layout
  folder = tmp_path / '20200820-subject-03' / '20200101_100004' / reader.SERIALS[0]
  folder.mkdir(parents=True)
  from PIL import Image  # pylint: disable=g-import-not-at-top

  Image.fromarray(np.full((24, 32), 650, np.uint16)).save(folder / 'color_000000.png')
  example = next(dexycb.examples(root, 'test', mano_dir=mano_dir, depth_dir=tmp_path))
  np.testing.assert_allclose(example['depth'], 0.65)  # 16-bit PNG in millimetres
