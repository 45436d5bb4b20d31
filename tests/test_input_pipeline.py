"""Tests of the tf.data pipelines on small in-memory sources with the hand features."""

import numpy as np
import pytest
import tensorflow as tf

from configs import synthetic as synthetic_config
from diffhand_jax import input_pipeline

SOURCE_SIZE = 96  # source images, pixels
CROP = 64  # config.data.image_size in these tests


def _gaussian_blob(size, center, sigma=1.5):
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
  return np.exp(-((xs - center[0]) ** 2 + (ys - center[1]) ** 2) / (2 * sigma**2))


def _hand_examples(num, *, seed=0, with_depth=False):
  """Numpy examples with the features of datasets/features.py (the fields the pipeline reads).

  Each image is black with a bright Gaussian blob centred on the projection of joint 0 (whose
  pixel centre convention is the one of joints2d), so the image warp can be checked too.
  """
  rng = np.random.default_rng(seed)
  examples = {
      k: [] for k in ('image', 'K', 'joints3d', 'joints2d', 'verts', 'is_right', 'id', 'depth')
  }
  for index in range(num):
    focal = rng.uniform(180, 220, 2)
    K = np.array(
        [[focal[0], 0, 48 + rng.uniform(-4, 4)], [0, focal[1], 48 + rng.uniform(-4, 4)], [0, 0, 1]],
        np.float32,
    )
    center = np.array([rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02), rng.uniform(0.45, 0.6)])
    joints3d = (center + rng.normal(0, 0.025, (21, 3))).astype(np.float32)
    verts = (center + rng.normal(0, 0.03, (778, 3))).astype(np.float32)
    uvw = joints3d @ K.T
    joints2d = (uvw[:, :2] / uvw[:, 2:]).astype(np.float32)
    blob = _gaussian_blob(SOURCE_SIZE, joints2d[0])
    image = np.clip(np.stack([blob * 250, blob * 200, blob * 150], -1), 0, 255)
    depth = np.where(blob > 0.1, center[2], 0.0)[..., None].astype(np.float32)
    for key, value in zip(
        examples,
        (
            image.round().astype(np.uint8),
            K,
            joints3d,
            joints2d,
            verts,
            index % 3 != 1,
            index,
            depth,
        ),
    ):
      examples[key].append(value)
  if not with_depth:
    del examples['depth']
  return {k: np.stack(v) for k, v in examples.items()}


def _source(examples):
  return tf.data.Dataset.from_tensor_slices(examples)


def _config(use_depth=False, **data_overrides):
  config = synthetic_config.get_config('smoke')
  config.data.image_size = CROP
  config.data.shuffle_buffer = 16
  config.data.update(data_overrides)
  config.model.use_depth = use_depth
  return config


def _train_batches(examples, config, num_batches, batch_size=4, start_step=0):
  dataset = input_pipeline.train_dataset_from(
      _source(examples), len(examples['id']), config, batch_size=batch_size, start_step=start_step
  )
  return list(dataset.take(num_batches).as_numpy_iterator())


def _project(K, points):
  uvw = points @ K.T
  return uvw[:, :2] / uvw[:, 2:]


STRONG_AUGMENTATION = dict(
    rotation_deg=60.0, scale_jitter=0.3, center_jitter=0.15, color_jitter=0.2, flip=True
)


@pytest.mark.parametrize(
    'overrides',
    [
        {},  # the default augmentation
        STRONG_AUGMENTATION,
        dict(rotation_deg=0.0, scale_jitter=0.0, center_jitter=0.0, flip=False),
    ],
)
def test_reprojection_of_3d_labels_matches_2d_labels(overrides):
  examples = _hand_examples(12)
  config = _config(**overrides)
  worst = 0.0
  for batch in _train_batches(examples, config, 3):
    for b in range(len(batch['index'])):
      points = batch['joints3d'][b] + batch['root'][b]
      reprojected = _project(batch['K'][b].astype(np.float64), points.astype(np.float64))
      pixels = (batch['joints2d'][b] + 1.0) * CROP / 2.0
      worst = max(worst, np.abs(reprojected - pixels).max())
      # The hand really is a right hand now: x was negated for left hands.
      source = examples['joints3d'][batch['index'][b]]
      offsets = source - source[0]
      np.testing.assert_allclose(
          np.linalg.norm(batch['joints3d'][b], axis=-1), np.linalg.norm(offsets, axis=-1), atol=1e-5
      )
  assert worst <= 0.5, worst


def test_augmented_image_moves_with_the_labels():
  """The blob drawn at joint 0 lands where the transformed 2D joint 0 says (image path)."""
  examples = _hand_examples(12)
  checked = 0
  for batch in _train_batches(examples, _config(**STRONG_AUGMENTATION), 3):
    for b in range(len(batch['index'])):
      intensity = input_pipeline.denormalize_image(batch['image'][b])[..., 0]
      intensity = np.clip(intensity, 0, None)
      expected = (batch['joints2d'][b, 0] + 1.0) * CROP / 2.0
      ys, xs = np.mgrid[0:CROP, 0:CROP]
      window = (np.abs(xs - expected[0]) <= 8) & (np.abs(ys - expected[1]) <= 8)
      weights = intensity * window
      if weights.sum() < 100 or not (8 < expected).all() or not (expected < CROP - 8).all():
        continue  # blob cut by the crop border: its centroid is biased
      centroid = np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()
      np.testing.assert_allclose(centroid, expected, atol=0.5)
      checked += 1
  assert checked >= 6  # most blobs are well inside the crop


def test_left_hands_are_mirrored_and_flagged():
  examples = _hand_examples(6)
  config = _config(rotation_deg=0.0, scale_jitter=0.0, center_jitter=0.0, flip=False)
  batch = _train_batches(examples, config, 1, batch_size=6)[0]
  for b, index in enumerate(batch['index']):
    source = examples['joints3d'][index]
    sign = np.array([1.0 if examples['is_right'][index] else -1.0, 1.0, 1.0])
    np.testing.assert_allclose(batch['joints3d'][b], (source - source[0]) * sign, atol=1e-6)
    np.testing.assert_allclose(batch['root'][b], source[0] * sign, atol=1e-6)
    assert batch['is_right'][b] == int(examples['is_right'][index])


def test_batch_contract_shapes_and_dtypes():
  examples = _hand_examples(8, with_depth=True)
  config = _config(use_depth=True)
  batch = _train_batches(examples, config, 1)[0]
  expected = {
      'image': (np.float32, (4, CROP, CROP, 3)),
      'depth': (np.float32, (4, CROP, CROP, 1)),
      'verts': (np.float32, (4, 778, 3)),
      'joints3d': (np.float32, (4, 21, 3)),
      'joints2d': (np.float32, (4, 21, 2)),
      'root': (np.float32, (4, 3)),
      'K': (np.float32, (4, 3, 3)),
      'is_right': (np.int32, (4,)),
      'index': (np.int32, (4,)),
      'valid': (np.float32, (4,)),
  }
  assert set(batch) == set(expected)
  for key, (dtype, shape) in expected.items():
    assert batch[key].dtype == dtype and batch[key].shape == shape, key
  np.testing.assert_array_equal(batch['joints3d'][:, 0], 0.0)
  np.testing.assert_array_equal(batch['valid'], 1.0)
  # Depth: root-relative on the hand, exactly 0 on the background.
  depth = batch['depth']
  root_depth = batch['root'][:, 2]
  source_depth = examples['depth'][batch['index']].max(axis=(1, 2, 3))
  for b in range(4):
    hand = depth[b][depth[b] != 0]
    np.testing.assert_allclose(hand, source_depth[b] - root_depth[b], atol=1e-6)
  assert (depth != 0).any()


def test_imagenet_normalisation_of_a_uniform_image():
  image = np.full((40, 50, 3), (10, 120, 240), np.uint8)
  processed, _ = input_pipeline.preprocess_image(image, 16)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  expected = (np.array([10, 120, 240]) / 255.0 - mean) / std
  np.testing.assert_allclose(processed, np.broadcast_to(expected, (16, 16, 3)), atol=1e-5)


def test_preprocess_image_crop_intrinsics_follow_the_image():
  K = np.array([[300.0, 0, 70], [0, 310.0, 45], [0, 0, 1]], np.float32)
  point = np.array([0.03, -0.02, 0.5])
  uv = _project(K, point[None])[0]
  image = np.zeros((100, 140, 3), np.uint8)
  image[..., 1] = np.round(_gaussian_blob(140, uv)[:100] * 255)
  processed, K_crop = input_pipeline.preprocess_image(image, 48, box=(40, 20, 100, 70), K=K)
  intensity = input_pipeline.denormalize_image(processed)[..., 1]
  intensity = np.where(intensity > 5, intensity, 0)
  ys, xs = np.mgrid[0:48, 0:48]
  centroid = np.array([(xs * intensity).sum(), (ys * intensity).sum()]) / intensity.sum()
  np.testing.assert_allclose(centroid, _project(K_crop, point[None])[0], atol=0.3)
  # The box (60 x 50) becomes a square of side 60 around its centre: scale 48 / 60.
  np.testing.assert_allclose(K_crop[0, 0], 300.0 * 48 / 60, rtol=1e-6)


@pytest.mark.parametrize('bad', [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32)])
def test_preprocess_image_rejects_bad_input(bad):
  with pytest.raises(ValueError, match='image must'):  # [H, W, 3] uint8
    input_pipeline.preprocess_image(bad, 16)
  with pytest.raises(ValueError, match='box'):
    input_pipeline.preprocess_image(np.zeros((8, 8, 3), np.uint8), 16, box=(5, 5, 2, 9))


@pytest.mark.parametrize('start_step', [3, 7])  # inside epoch 1, and in epoch 2 (3 steps/epoch)
def test_resume_is_bitwise_identical(start_step):
  examples = _hand_examples(13)
  config = _config(**STRONG_AUGMENTATION)
  from_zero = _train_batches(examples, config, start_step + 2)
  resumed = _train_batches(examples, config, 2, start_step=start_step)
  for expected, batch in zip(from_zero[start_step:], resumed):
    assert set(expected) == set(batch)
    for key in batch:
      np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
  # Epochs differ (reshuffled, re-augmented) and another seed gives another stream.
  assert not np.array_equal(from_zero[0]['image'], from_zero[3]['image'])
  config.seed = 1
  other = _train_batches(examples, config, 1)[0]
  assert not np.array_equal(other['image'], from_zero[0]['image'])


def test_each_epoch_visits_distinct_examples():
  examples = _hand_examples(13)
  batches = _train_batches(examples, _config(), 6)
  for epoch in range(2):
    ids = np.concatenate([b['index'] for b in batches[3 * epoch : 3 * epoch + 3]])
    assert len(set(ids.tolist())) == 12 and set(ids.tolist()) <= set(range(13))


@pytest.mark.parametrize('start_step', [0, 4])
def test_global_batches_do_not_depend_on_the_process_count(start_step):
  """Two processes' shares of each step, stacked process-major, are the one-process batch
  (issue 13: a two-process job trains on the same global batches as one process)."""
  examples = _hand_examples(13)  # 3 global batches of 4 per epoch; 7 steps cross two epochs
  config = _config(**STRONG_AUGMENTATION)

  def batches(batch_size, **process):
    dataset = input_pipeline.train_dataset_from(
        _source(examples),
        13,
        config,
        batch_size=batch_size,
        start_step=start_step,
        **process,
    )
    return list(dataset.take(7 - start_step).as_numpy_iterator())

  one = batches(4, process_index=0, process_count=1)
  shares = [batches(2, process_index=p, process_count=2) for p in range(2)]
  for step, expected in enumerate(one):
    for key in expected:
      stacked = np.concatenate([shares[0][step][key], shares[1][step][key]])
      np.testing.assert_array_equal(stacked, expected[key], err_msg=f'step {step} {key}')
  assert not set(shares[0][0]['index'].tolist()) & set(shares[1][0]['index'].tolist())


@pytest.mark.parametrize('process_count', [1, 3])
def test_eval_covers_every_example_once_with_padding(process_count):
  examples = _hand_examples(11)
  config = _config()
  num_batches = input_pipeline.eval_num_batches(11, process_count, 2)
  seen, counts = [], set()
  for process in range(process_count):
    source = _source(examples).shard(process_count, process)
    num_local = len(range(process, 11, process_count))
    batches = list(
        input_pipeline.eval_dataset_from(
            source, num_local, config, batch_size=2, num_batches=num_batches
        ).as_numpy_iterator()
    )
    counts.add(len(batches))
    for batch in batches:
      valid = batch['valid'] == 1
      seen.extend(batch['index'][valid].tolist())
      assert (batch['index'][~valid] == -1).all()
      assert np.isfinite(batch['verts']).all()
  assert counts == {num_batches}
  assert sorted(seen) == list(range(11))


def test_eval_applies_no_augmentation():
  examples = _hand_examples(4)
  config = _config(**STRONG_AUGMENTATION)
  first, second = (
      list(
          input_pipeline.eval_dataset_from(
              _source(examples), 4, config, batch_size=4, num_batches=1
          ).as_numpy_iterator()
      )[0]
      for _ in range(2)
  )
  np.testing.assert_array_equal(first['image'], second['image'])
  # No rotation: a right hand's 3D labels are the source offsets, unrotated.
  right = [b for b, i in enumerate(first['index']) if examples['is_right'][i]][0]
  source = examples['joints3d'][first['index'][right]]
  np.testing.assert_allclose(first['joints3d'][right], source - source[0], atol=1e-6)


def test_errors_name_the_problem():
  examples = _hand_examples(3)
  with pytest.raises(ValueError, match='cannot fill one batch'):
    input_pipeline.train_dataset_from(_source(examples), 3, _config(), batch_size=4)
  with pytest.raises(ValueError, match='no depth'):
    input_pipeline.train_dataset_from(_source(examples), 3, _config(use_depth=True), batch_size=2)
  config = _config()
  config.data.name = 'imagenet'
  with pytest.raises(ValueError, match='unknown config.data.name'):
    input_pipeline.get_builder(config)


def test_nan_labels_fail_naming_key_and_example():
  examples = _hand_examples(4)
  examples['verts'][2, 5, 1] = np.nan
  dataset = input_pipeline.train_dataset_from(_source(examples), 4, _config(), batch_size=4)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'non-finite verts[\s\S]*\b2\b'):
    next(dataset.as_numpy_iterator())


def test_eval_crop_whole_image_ignores_the_joints():
  examples = _hand_examples(3)
  config = _config(eval_crop='image')
  batch = next(
      input_pipeline.eval_dataset_from(
          _source(examples), 3, config, batch_size=3, num_batches=1
      ).as_numpy_iterator()
  )
  for b, index in enumerate(batch['index']):
    K = examples['K'][index].astype(np.float64)
    # The whole 96 px image (centre 47.5) becomes the 64 px crop (centre 31.5).
    expected = K.copy()
    expected[:2] *= CROP / SOURCE_SIZE
    expected[:2, 2] += (CROP - 1) / 2 - (SOURCE_SIZE - 1) / 2 * CROP / SOURCE_SIZE
    if not examples['is_right'][index]:
      # The box centre is the mirrored image centre 2 c_x - 47.5.
      expected[0, 2] = (CROP - 1) / 2 + (K[0, 2] - (2 * K[0, 2] - 47.5)) * CROP / SOURCE_SIZE
    np.testing.assert_allclose(batch['K'][b], expected, rtol=1e-5, atol=1e-3)
  config.data.eval_crop = 'hand'
  with pytest.raises(ValueError, match='eval_crop'):
    input_pipeline.eval_dataset_from(_source(examples), 3, config, batch_size=3, num_batches=1)
