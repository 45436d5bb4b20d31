"""The TFDS feature spec shared by every hand data set (one place, so pipelines read all alike).

Every example is a dict with these keys (metres, camera frame; FreiHAND joint order):
  image     uint8 (H, W, 3), PNG/JPEG-encoded in the TFRecords
  mask      uint8 (H, W, 1), 255 = hand
  depth     float32 (H, W, 1), metres along the optical axis, 0 where nothing was hit
            (present only when the builder config has depth)
  K         float32 (3, 3) pinhole intrinsics in pixels of `image`
  joints3d  float32 (21, 3)
  joints2d  float32 (21, 2) pixels, = project(K, joints3d)
  verts     float32 (778, 3)
  pose      float32 (48,) MANO axis-angle, global orientation first (hands_mean NOT added)
  betas     float32 (10,)
  is_right  bool
  id        int64: the example's index within its split
"""

import numpy as np
import tensorflow_datasets as tfds
import tensorflow as tf

NUM_VERTICES = 778
NUM_JOINTS = 21


def hand_features(with_depth=False, image_encoding='png', extra=None):
  """Returns the `tfds.features.FeaturesDict` of hand examples.

  Args:
    with_depth: add the float32 `depth` map.
    image_encoding: 'png' (lossless, synthetic data) or 'jpeg' (real photographs).
    extra: a data set's own features {name: tfds feature}, added after the shared ones.
  """
  spec = {
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format=image_encoding),
      'mask': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
      'K': tfds.features.Tensor(shape=(3, 3), dtype=tf.float32),
      'joints3d': tfds.features.Tensor(shape=(NUM_JOINTS, 3), dtype=tf.float32),
      'joints2d': tfds.features.Tensor(shape=(NUM_JOINTS, 2), dtype=tf.float32),
      'verts': tfds.features.Tensor(shape=(NUM_VERTICES, 3), dtype=tf.float32),
      'pose': tfds.features.Tensor(shape=(48,), dtype=tf.float32),
      'betas': tfds.features.Tensor(shape=(10,), dtype=tf.float32),
      'is_right': tfds.features.Tensor(shape=(), dtype=tf.bool),
      'id': tfds.features.Tensor(shape=(), dtype=tf.int64),
  }
  if with_depth:
    spec['depth'] = tfds.features.Tensor(
        shape=(None, None, 1), dtype=tf.float32, encoding=tfds.features.Encoding.ZLIB
    )
  spec.update(extra or {})
  return tfds.features.FeaturesDict(spec)


def bbox_features():
  """The features of data sets with a hand box and optional labels (DexYCB, HO-3D).

  bbox float32 (4,) x0, y0, x1, y1 in pixels; has_targets bool (False: the targets are zeros).
  """
  return {
      'bbox': tfds.features.Tensor(shape=(4,), dtype=tf.float32),
      'has_targets': tfds.features.Tensor(shape=(), dtype=tf.bool),
  }


TARGET_SHAPES = {
    'joints3d': (NUM_JOINTS, 3),
    'joints2d': (NUM_JOINTS, 2),
    'verts': (NUM_VERTICES, 3),
    'pose': (48,),
    'betas': (10,),
}


def to_record(example, with_depth):
  """A reader example -> the `hand_features` schema (zeros for absent targets and mask).

  The image is passed as its file path, so TFDS stores the released bytes unchanged (no
  second lossy JPEG encoding).
  """
  image_shape = example['image'].shape
  record = {
      'image': example['image_path'],
      'mask': example.get('mask', np.zeros(image_shape[:2] + (1,), np.uint8)),
      'K': example['K'],
      'is_right': example['is_right'],
      'id': example['id'],
  }
  for name, shape in TARGET_SHAPES.items():
    record[name] = example.get(name, np.zeros(shape, np.float32))
  if with_depth:
    record['depth'] = example['depth']
  return record
