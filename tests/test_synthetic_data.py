"""Tests of the synthetic hand sampler and example generator (numpy path, no TF)."""

import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from datasets.synthetic import appearance
from datasets.synthetic import generate
from datasets.synthetic import sampler
from diffhand_jax import mano
from diffhand_jax import procedural_mano
from diffhand_jax import render

SIZE = 64


@pytest.fixture(scope='module')
def hand_model():
  return procedural_mano.procedural_hand(0)


@pytest.fixture(scope='module')
def batch(hand_model):
  return list(generate.examples(hand_model, seed=7, start=0, count=12, image_size=SIZE))


def _signed_volume(vertices, faces):
  """Volume enclosed by the (nearly closed) mesh: > 0 when faces wind outwards."""
  corners = vertices[faces] - vertices.mean(axis=0)
  return np.einsum('fi,fi->f', corners[:, 0], np.cross(corners[:, 1], corners[:, 2])).sum() / 6


def test_same_seed_same_example_and_indices_differ(hand_model, batch):
  again = generate.make_example(hand_model, 7, 3, SIZE)
  for key, value in batch[3].items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)
  assert not np.array_equal(batch[3]['image'], batch[4]['image'])
  assert not np.allclose(batch[3]['pose'], batch[4]['pose'])
  other_seed = generate.make_example(hand_model, 8, 3, SIZE)
  assert not np.allclose(other_seed['verts'], batch[3]['verts'])
  eval_stream = generate.make_example(hand_model, 7, 3, SIZE, stream=generate.EVAL_STREAM)
  assert not np.allclose(eval_stream['verts'], batch[3]['verts'])


def test_examples_start_offset_matches_make_example(hand_model, batch):
  tail = list(generate.examples(hand_model, seed=7, start=10, count=2, image_size=SIZE))
  for offset, example in enumerate(tail):
    assert example['id'] == 10 + offset
    np.testing.assert_array_equal(example['image'], batch[10 + offset]['image'])


def test_feature_format(batch):
  example = batch[0]
  expected = {
      'image': (np.uint8, (SIZE, SIZE, 3)),
      'depth': (np.float32, (SIZE, SIZE, 1)),
      'mask': (np.uint8, (SIZE, SIZE, 1)),
      'K': (np.float32, (3, 3)),
      'joints3d': (np.float32, (21, 3)),
      'joints2d': (np.float32, (21, 2)),
      'verts': (np.float32, (778, 3)),
      'pose': (np.float32, (48,)),
      'betas': (np.float32, (10,)),
  }
  for key, (dtype, shape) in expected.items():
    assert example[key].dtype == dtype and example[key].shape == shape, key
  assert isinstance(example['is_right'], bool)
  assert example['id'].dtype == np.int64
  assert set(np.unique(example['mask'])) <= {0, 255}


def test_joints2d_are_the_projection_of_joints3d(batch):
  for example in batch:
    K = example['K'].astype(np.float64)
    joints = example['joints3d'].astype(np.float64)
    projected = np.array(
        [(K[0, 0] * x / z + K[0, 2], K[1, 1] * y / z + K[1, 2]) for x, y, z in joints]
    )
    np.testing.assert_allclose(example['joints2d'], projected, atol=1e-3)


def test_geometry_is_mano_forward_moved_and_mirrored(hand_model, batch):
  sides = set()
  for example in batch:
    verts, joints = mano.mano_forward(hand_model, example['pose'][None], example['betas'][None])
    verts, joints = np.asarray(verts[0]), np.asarray(joints[0])
    mirror = np.array([1.0, 1.0, 1.0]) if example['is_right'] else np.array([-1.0, 1.0, 1.0])
    sides.add(example['is_right'])
    # Undo the mirror; what is left must be a pure translation of the MANO output.
    offset_v = example['verts'] * mirror - verts
    offset_j = example['joints3d'] * mirror - joints
    np.testing.assert_allclose(
        offset_v, np.broadcast_to(offset_v.mean(0), offset_v.shape), atol=2e-5
    )
    np.testing.assert_allclose(
        offset_j, np.broadcast_to(offset_v.mean(0), offset_j.shape), atol=2e-5
    )
    # Chirality: with the model's (right-hand) faces, a left hand is inside out.
    volume = _signed_volume(example['verts'].astype(np.float64), np.asarray(hand_model.faces))
    assert (volume > 0) == example['is_right']
  assert sides == {True, False}


def test_mask_and_depth_are_the_hands_own_render(hand_model, batch):
  faces = np.asarray(hand_model.faces)
  for example in batch:
    mask = example['mask'][..., 0] > 0
    depth = example['depth'][..., 0]
    np.testing.assert_array_equal(mask, depth > 0)
    assert mask.sum() > 30
    # Independent of any occluder: rasterising the stored geometry gives the same maps.
    oriented = faces if example['is_right'] else faces[:, ::-1]
    raster = render.rasterize(example['verts'], oriented, example['K'], SIZE, SIZE)
    np.testing.assert_array_equal(raster.face_index >= 0, mask)
    np.testing.assert_allclose(raster.depth, depth, rtol=1e-5)
    z = example['verts'][:, 2]
    assert z.min() - 1e-6 <= depth[mask].min() and depth[mask].max() <= z.max() + 1e-6


def test_hand_is_inside_the_image_and_camera_is_plausible(batch):
  for example in batch:
    uv = render.project_points(example['verts'], example['K'])
    assert np.all(uv >= 0) and np.all(uv <= SIZE - 1)
    K = example['K']
    focal = sampler.FOCAL_AT_224 * SIZE / 224
    assert 0.89 * focal <= K[0, 0] == K[1, 1] <= 1.11 * focal
    np.testing.assert_allclose(K[:2, 2], (SIZE - 1) / 2, atol=0.021 * SIZE)
    root_depth = example['joints3d'][0, 2]
    assert sampler.DEPTH_RANGE[0] - 1e-6 <= root_depth < 2.0


def test_articulation_respects_per_axis_limits(hand_model):
  frames = sampler.joint_frames(hand_model)
  np.testing.assert_allclose(
      np.einsum('jab,jcb->jac', frames.axes, frames.axes),
      np.broadcast_to(np.eye(3), (15, 3, 3)),
      atol=1e-9,
  )
  rng = np.random.default_rng(0)
  angles = np.stack(
      [
          np.einsum('jac,jc->ja', frames.axes, sampler.sample_articulation(rng, frames))
          for _ in range(300)
      ]
  )  # [N, 15, 3]
  spread = np.abs(frames.fan) * max(np.abs(sampler.SPREAD_RANGE))
  for chain in ((1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12)):
    for joint, kind in zip(chain, ('mcp', 'pip', 'dip')):
      for axis, (low, high) in enumerate(sampler.FINGER_LIMITS[kind]):
        extra = spread[joint - 1] if axis == 1 else 0.0
        values = angles[:, joint - 1, axis]
        assert low - extra - 1e-9 <= values.min() and values.max() <= high + extra + 1e-9
  for joint, kind in zip((13, 14, 15), ('cmc', 'mcp', 'ip')):
    for axis, (low, high) in enumerate(sampler.THUMB_LIMITS[kind]):
      values = angles[:, joint - 1, axis]
      assert low - 1e-9 <= values.min() and values.max() <= high + 1e-9
  # Flexion dominates: on average it is positive and larger than abduction.
  flexion, abduction = angles[:, :12, 0], angles[:, :12, 1]
  assert flexion.mean() > 0.3 and np.abs(flexion).mean() > 3 * np.abs(abduction).mean()


def test_flexion_curls_fingers_towards_the_palm(hand_model):
  frames = sampler.joint_frames(hand_model)
  rest = mano.joint_regressor21(hand_model) @ np.asarray(hand_model.v_template, np.float64)
  palm_normal = np.cross(rest[5] - rest[0], rest[17] - rest[0])
  pose = np.zeros((1, 48), np.float32)
  pose[0, 3:] = (0.8 * frames.axes[:, 0]).ravel()  # every joint flexed 0.8 rad
  _, joints = mano.mano_forward(hand_model, pose, np.zeros((1, 10)), flat_hand_mean=True)
  moved = np.asarray(joints[0]) - rest
  for tip in (8, 12, 16, 20):
    assert moved[tip] @ palm_normal > 0.02 * np.linalg.norm(palm_normal)


def test_uniform_rotations_average_to_zero():
  rng = np.random.default_rng(1)
  axis_angles = np.float32([sampler.sample_rotation(rng) for _ in range(4000)])
  rotations = np.asarray(mano.rodrigues(axis_angles))
  # E[R] = 0 for the uniform (Haar) distribution on SO(3).
  assert np.abs(rotations.mean(axis=0)).max() < 0.05
  np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-5)


def test_hand_rotations_keep_the_fingers_from_pointing_away(hand_model):
  rng = np.random.default_rng(4)
  forward = sampler.joint_frames(hand_model).forward
  axis_angles = np.float32([sampler.sample_hand_rotation(rng, forward) for _ in range(2000)])
  directions = np.asarray(mano.rodrigues(axis_angles)) @ forward  # [N, 3]
  assert directions[:, 2].max() <= sampler.MAX_AWAY + 1e-5
  # Conditioning on z only: the other two components stay symmetric, z covers its range.
  assert np.abs(directions[:, :2].mean(axis=0)).max() < 0.05
  assert directions[:, 2].min() < -0.95 and directions[:, 2].max() > sampler.MAX_AWAY - 0.05


def test_place_in_view_fits_even_when_too_close():
  rng = np.random.default_rng(2)
  K = np.array([[500.0, 0.0, 111.5], [0.0, 500.0, 111.5], [0.0, 0.0, 1.0]])
  points = rng.uniform(-0.1, 0.1, size=(200, 3))
  for _ in range(20):
    translation = sampler.place_in_view(rng, points, K, 224, depth_range=(0.3, 0.8))
    uv = render.project_points(points + translation, K)
    assert np.all(uv >= 2.0 - 1e-6) and np.all(uv <= 221.0 + 1e-6)
    assert translation[2] >= 0.3
  with pytest.raises(ValueError, match='no room'):
    sampler.place_in_view(rng, points, K, 4)


def test_smooth_noise_is_bilinear_interpolation_of_its_knots():
  size, grid = 23, 4
  noise = appearance.smooth_noise(np.random.default_rng(5), size, grid)
  knots = np.random.default_rng(5).uniform(0.0, 1.0, size=(grid, grid, 3))
  position = np.linspace(0.0, grid - 1.0, size)
  expected = np.zeros((size, size, 3))
  for i, y in enumerate(position):
    for j, x in enumerate(position):
      y0, x0 = min(int(y), grid - 2), min(int(x), grid - 2)
      fy, fx = y - y0, x - x0
      expected[i, j] = (
          (1 - fy) * (1 - fx) * knots[y0, x0]
          + fy * (1 - fx) * knots[y0 + 1, x0]
          + (1 - fy) * fx * knots[y0, x0 + 1]
          + fy * fx * knots[y0 + 1, x0 + 1]
      )
  np.testing.assert_allclose(noise, expected, atol=1e-12)
  np.testing.assert_allclose(
      noise[[0, 0, -1, -1], [0, -1, 0, -1]], knots[[0, 0, -1, -1], [0, -1, 0, -1]], atol=1e-12
  )


def test_backgrounds_and_occluders():
  rng = np.random.default_rng(3)
  for _ in range(8):
    texture = appearance.background_texture(rng, 32)
    assert texture.shape == (32, 32, 3) and texture.min() >= 0 and texture.max() <= 1
    assert texture.std() > 0.005
  mask = np.zeros((32, 32), bool)
  mask[8:24, 10:20] = True
  shapes = [appearance.occluder_mask(rng, 32, mask) for _ in range(200)]
  drawn = [shape for shape in shapes if shape is not None]
  assert 0.2 < len(drawn) / len(shapes) < 0.4
  assert all((shape & mask).any() for shape in drawn)  # centred on a hand pixel


def test_hand_and_background_are_not_flat(batch):
  for example in batch:
    mask = example['mask'][..., 0] > 0
    assert example['image'][mask].std() > 0 and example['image'][~mask].std() > 0


@pytest.mark.parametrize(
    'kwargs, message',
    [
        ({'seed': -1, 'index': 0, 'image_size': 64}, 'non-negative'),
        ({'seed': 0, 'index': 0, 'image_size': 8}, 'at least'),
        ({'seed': 0, 'index': 1.5, 'image_size': 64}, 'integer'),
    ],
)
def test_bad_arguments_raise(hand_model, kwargs, message):
  with pytest.raises(ValueError, match=message):
    generate.make_example(hand_model, **kwargs)


@pytest.mark.slow
def test_figure_and_benchmark_scripts_run(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  out = tmp_path / 'samples.png'
  subprocess.run(
      [
          sys.executable,
          str(root / 'docs/make_samples_figure.py'),
          '--out',
          str(out),
          '--rows',
          '1',
          '--cols',
          '2',
          '--size',
          '48',
      ],
      check=True,
      capture_output=True,
  )
  assert Image.open(out).size == (2 * 48 + 4, 48)
  result = subprocess.run(
      [sys.executable, str(root / 'benchmarks/render.py'), '--frames', '4', '--sizes', '32'],
      check=True,
      capture_output=True,
      text=True,
  )
  assert '32x32: render' in result.stdout and 'ms/frame' in result.stdout
