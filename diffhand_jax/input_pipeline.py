"""tf.data input pipelines: hand examples (datasets/features.py) -> numpy batches.

The output contract is the "Batch" table of docs/ARCHITECTURE.md. One affine warp per example
does the crop, rotation, optional mirroring and resize together; labels go through the same
geometry:

  3D:     X' = M X,  M = R_z(angle) @ diag(-1 if mirrored else 1, 1, 1)
  pixels: P = K M K^-1 (a rotation about the optical axis / a mirror is an exact affine map of
          the image that keeps K), then C = the square crop box -> S x S pixels;
          image warped by T = C P, crop intrinsics K' = C K, so project(K', X') = T(project(K, X)).

Pixel coordinates have pixel centres on integers (OpenCV / ImageProjectiveTransform convention).
Mirroring uses u -> 2 c_x - u (the mirror through the principal point), which keeps K; the
"flip the image, mirror the principal point" form differs from it only by a horizontal shift,
which the crop (centred on the hand) absorbs.

The training stream is a deterministic function of (config.seed, start_step): per-epoch shuffles
seeded by (seed, epoch), augmentation drawn with stateless ops from (seed, epoch, example id),
resume by skipping whole epochs arithmetically and then examples inside the epoch.
"""

import math
import os

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from datasets.dexycb import dexycb
from datasets.freihand import freihand
from datasets.ho3d import ho3d
from datasets.synthetic import synthetic_hands
from diffhand_jax import checks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Source keys the pipeline reads (the rest of the features, e.g. mask and pose, are dropped).
_SOURCE_KEYS = (
    'image',
    'depth',
    'K',
    'joints3d',
    'joints2d',
    'verts',
    'is_right',
    'id',
    'has_targets',
    'bbox',
)
_NUM_DRAWS = 8  # angle, scale, centre x/y, flip, 3 colour gains


def _hide_gpus_from_tf():
  """TF must not grab accelerator memory that JAX needs."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF was already initialised by someone else; nothing to do then.
    pass


_hide_gpus_from_tf()


# ---- Geometry (tf, float32) ----


def normalize_image(image):
  """ImageNet normalisation. Args: image: [..., 3] uint8 or float in [0, 255]. Returns float32."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def denormalize_image(image):
  """Inverse of `normalize_image`: float32 [..., 3] -> float32 in [0, 255] (numpy or tf)."""
  return (
      np.asarray(image) * np.array(IMAGENET_STD, np.float32) + np.array(IMAGENET_MEAN, np.float32)
  ) * 255.0


def crop_transform(center, side, size):
  """The pixel affine [3,3] that maps the square box (centre [2], side) onto a size x size crop."""
  center = tf.cast(center, tf.float32)
  scale = tf.cast(size, tf.float32) / tf.cast(side, tf.float32)
  offset = (size - 1) / 2.0 - scale * center
  return tf.stack(
      [
          tf.stack([scale, 0.0, offset[0]]),
          tf.stack([0.0, scale, offset[1]]),
          tf.constant([0.0, 0.0, 1.0]),
      ]
  )


def camera_motion(angle, mirror):
  """The 3D motion M [3,3] = R_z(angle) @ diag(-1 if mirror else 1, 1, 1)."""
  cos, sin = tf.cos(angle), tf.sin(angle)
  sign = tf.where(mirror, -1.0, 1.0)
  rotation = tf.stack(
      [tf.stack([cos, -sin, 0.0]), tf.stack([sin, cos, 0.0]), tf.constant([0.0, 0.0, 1.0])]
  )
  return rotation * tf.stack([sign, 1.0, 1.0])[None, :]


def apply_affine(transform, points):
  """Args: transform: [3,3] pixel affine; points: [P,2]. Returns [P,2]."""
  return points @ tf.transpose(transform[:2, :2]) + transform[:2, 2]


def square_box(low, high):
  """The square box around [low, high] corners ([2] each): (centre [2], side)."""
  return (low + high) / 2.0, tf.reduce_max(high - low)


def warp_image(image, transform, size, interpolation='BILINEAR'):
  """Resamples image [H,W,C] float32 into [size,size,C] with pixel map `transform` (src->dst)."""
  inverse = tf.linalg.inv(transform)
  inverse = inverse / inverse[2, 2]
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None],
      transforms=tf.reshape(inverse, [9])[None, :8],
      output_shape=tf.constant([size, size], tf.int32),
      fill_value=tf.constant(0.0),
      interpolation=interpolation,
      fill_mode='CONSTANT',
  )
  return tf.ensure_shape(warped[0], [size, size, image.shape[-1]])


def _decode(image):
  """Images come encoded (tfds SkipDecoding: decode after skipping) or already as uint8."""
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


def _assert_finite(example):
  """Fails the pipeline on NaN/inf labels, naming the key and the example id."""
  for key in ('K', 'joints3d', 'joints2d', 'verts'):
    tf.debugging.Assert(
        tf.reduce_all(tf.math.is_finite(example[key])),
        [f'non-finite {key} in the hand example with id', example['id']],
    )


def _camera_motion_of(example, data_config, draws):
  """The 3D motion M [3,3] of an example and its output handedness (is_right bool).

  Without draws (evaluation) M only mirrors left hands. With draws: rotation by
  draws[0] * rotation_deg, and a horizontal flip when data_config.flip and draws[4] > 0.
  """
  is_right = tf.cast(example['is_right'], tf.bool)
  if draws is None:
    return camera_motion(tf.constant(0.0), tf.logical_not(is_right)), is_right
  angle = draws[0] * math.radians(data_config.rotation_deg)
  flip = tf.logical_and(tf.constant(bool(data_config.flip)), draws[4] > 0)
  # A flipped capture shows the other hand; canonicalisation then mirrors every left hand to
  # the right. Composed, the geometry is mirrored iff the hand was captured left, so `flip`
  # changes only the reported handedness (the right-hand frame of the contract makes a
  # horizontal flip otherwise redundant).
  shown_right = tf.math.logical_xor(is_right, flip)
  mirror = tf.math.logical_xor(flip, tf.logical_not(shown_right))
  return camera_motion(angle, mirror), shown_right


def _crop_box(example, image, moved_joints2d, pixel_motion, crop_margin, whole_image=False):
  """The square crop (centre [2], side) before jitter: around the moved 2D joints, or the
  whole (moved) image when `whole_image` or when the example has no joints (has_targets =
  False: FreiHAND evaluation without annotations). An example without joints that has a
  given hand box (`bbox` x0,y0,x1,y1: HO-3D evaluation's handBoundingBox) is cropped around
  that box instead, with the same margin.
  """
  center, extent = square_box(tf.reduce_min(moved_joints2d, 0), tf.reduce_max(moved_joints2d, 0))
  side = crop_margin * tf.maximum(extent, 1.0)
  no_joints = tf.logical_not(tf.cast(example.get('has_targets', True), tf.bool))
  if 'bbox' in example:
    corners = apply_affine(pixel_motion, tf.reshape(tf.cast(example['bbox'], tf.float32), (2, 2)))
    box_center, box_extent = square_box(tf.reduce_min(corners, 0), tf.reduce_max(corners, 0))
    center = tf.where(no_joints, box_center, center)
    side = tf.where(no_joints, crop_margin * tf.maximum(box_extent, 1.0), side)
    no_joints = tf.constant(False)
  use_image = tf.logical_or(tf.constant(bool(whole_image)), no_joints)
  height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
  image_center = apply_affine(pixel_motion, tf.stack([(width - 1) / 2, (height - 1) / 2])[None])
  center = tf.where(use_image, image_center[0], center)
  side = tf.where(use_image, tf.maximum(width, height), side)
  return center, side


def transform_example(example, config, draws=None, whole_image=False):
  """Crops, augments and normalises one example into the contract's per-example layout.

  Args:
    example: dict with image ([H,W,3] uint8 or encoded string), K [3,3], joints3d [21,3],
      joints2d [21,2] pixels, verts [778,3], is_right bool, id int; optionally depth
      [H,W,1] metres and has_targets bool (False: crop the whole image, the joints are unknown).
    config: the experiment config: config.data (image_size S, crop_margin, jitters,
      rotation_deg, flip, color_jitter) and config.model.use_depth (whether to output depth).
    draws: [8] uniform in [-1, 1] (angle, scale, centre x, centre y, flip, 3 colour gains), or
      None for evaluation (no augmentation).
    whole_image: crop the whole image instead of the box around the 2D joints.

  Returns:
    dict: image [S,S,3], (depth [S,S,1]), verts [778,3], joints3d [21,3], joints2d [21,2] in
    [-1,1], root [3], K [3,3] float32; is_right, index int32; valid float32 (= 1).
  """
  _assert_finite(example)
  data_config, image_size = config.data, config.data.image_size
  image = tf.cast(_decode(example['image']), tf.float32)
  K = tf.cast(example['K'], tf.float32)
  augment = draws is not None
  motion, shown_right = _camera_motion_of(example, data_config, draws)
  pixel_motion = K @ motion @ tf.linalg.inv(K)
  moved_joints2d = apply_affine(pixel_motion, tf.cast(example['joints2d'], tf.float32))
  center, side = _crop_box(
      example, image, moved_joints2d, pixel_motion, data_config.crop_margin, whole_image
  )
  if augment:
    side *= 1.0 + data_config.scale_jitter * draws[1]
    center += data_config.center_jitter * side * draws[2:4]
  crop = crop_transform(center, side, image_size)
  transform = crop @ pixel_motion
  joints3d = tf.cast(example['joints3d'], tf.float32) @ tf.transpose(motion)
  verts = tf.cast(example['verts'], tf.float32) @ tf.transpose(motion)
  root = joints3d[0]
  warped = warp_image(image, transform, image_size)
  if augment:
    gains = 1.0 + data_config.color_jitter * draws[5:8]
    warped = tf.clip_by_value(warped * gains, 0.0, 255.0)
  output = {
      'image': normalize_image(warped),
      'verts': verts - root,
      'joints3d': joints3d - root,
      # The 2D labels follow the image path (the pixel map), the 3D ones the camera path; the
      # tests check that both agree through K'.
      'joints2d': apply_affine(crop, moved_joints2d) * (2.0 / image_size) - 1.0,
      'root': root,
      'K': crop @ K,
      'is_right': tf.cast(shown_right, tf.int32),
      'index': tf.cast(example['id'], tf.int32),
      'valid': tf.constant(1.0),
  }
  if config.model.use_depth:
    if 'depth' not in example:
      raise ValueError('config.model.use_depth is set but the data source has no depth feature')
    depth = warp_image(tf.cast(example['depth'], tf.float32), transform, image_size, 'NEAREST')
    # Mirroring and rotation about the optical axis keep z, so depth values need no change.
    output['depth'] = tf.where(depth > 0, depth - root[2], 0.0)
  return output


def preprocess_image(image, image_size, box=None, K=None):
  """Prepares one image for prediction, normalised exactly as in training.

  Args:
    image: uint8 [H,W,3].
    image_size: S.
    box: optional (x_min, y_min, x_max, y_max) pixels; the crop is the square around it.
      Default: the largest centred square.
    K: optional [3,3] intrinsics of `image`; default the identity, so the returned matrix is the
      pixel map image -> crop.

  Returns:
    (image float32 [S,S,3], K_crop float32 [3,3] = crop_map @ K).
  """
  image = checks.check_array('image', image, ('H', 'W', 3), kind=np.uint8)
  height, width = image.shape[:2]
  if box is None:
    center, side = np.array([(width - 1) / 2, (height - 1) / 2]), min(height, width)
  else:
    box = checks.check_array('box', box, (4,), dtype=np.float32)
    if not np.all(box[2:] > box[:2]):
      raise ValueError(f'box must be (x_min, y_min, x_max, y_max) with max > min, got {box}')
    center, side = square_box(box[:2], box[2:])
  K = np.eye(3) if K is None else K
  K = checks.check_array('K', K, (3, 3), dtype=np.float32)
  crop = crop_transform(center, side, image_size)
  warped = warp_image(tf.constant(image, tf.float32), crop, image_size)
  return normalize_image(warped).numpy(), (crop @ K).numpy()


# ---- Datasets from a source of examples ----


def _example_seed(seed, epoch, example_id):
  """A stateless [2] seed from (seed, epoch, example id)."""
  epoch_seed = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, 0], tf.int64), tf.cast(epoch, tf.int64)
  )
  return tf.random.experimental.stateless_fold_in(epoch_seed, tf.cast(example_id, tf.int64))


def _select(example):
  return {k: v for k, v in example.items() if k in _SOURCE_KEYS}


def train_dataset_from(
    source,
    num_examples,
    config,
    *,
    batch_size,
    start_step=0,
    deterministic=True,
    process_index=None,
    process_count=None,
):
  """The infinite, augmented, batched training stream of one process.

  Each epoch is a fresh shuffle of the whole `source` (seeded by (config.seed, epoch), the
  same on every process) cut into global batches of batch_size * process_count examples (the
  remainder is dropped, a different one each epoch); this process decodes and yields only its
  consecutive share of each global batch. So the global batch of step k is the same whatever
  the number of processes (process-major, as `parallel.global_batch` assembles it).
  tf.data combines the shuffle seed with TF's global seed: do not call tf.random.set_seed
  differently between a run and its resumption (nothing in this project calls it).

  Args:
    source: tf.data.Dataset of all training examples (every process reads the same), in a
      fixed order.
    num_examples: the number of examples in `source`.
    config: the experiment config (seed, data.*).
    batch_size: the per-process batch size.
    start_step: the number of batches already consumed (resume).
    deterministic: keep the element order of parallel maps fixed (needed for bitwise resume).
    process_index, process_count: this process and the number of processes (default: JAX's).

  Returns:
    tf.data.Dataset of batch dicts (ARCHITECTURE.md "Batch").
  """
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  global_batch_size = batch_size * process_count
  steps_per_epoch = num_examples // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(
        f'{num_examples} training examples cannot fill one batch of {global_batch_size}'
    )
  start_epoch, skip_batches = divmod(int(start_step), steps_per_epoch)
  seed = int(config.seed)
  buffer_size = max(1, min(int(config.data.shuffle_buffer), num_examples))
  source = source.map(_select)

  def augment(example, epoch):
    draws = tf.random.stateless_uniform(
        [_NUM_DRAWS], _example_seed(seed, epoch, example['id']), minval=-1.0, maxval=1.0
    )
    return transform_example(example, config, draws)

  def epoch_dataset(epoch):
    shuffle_seed = tf.cast(seed, tf.int64) * 1_000_003 + epoch
    examples = source.shuffle(buffer_size, seed=shuffle_seed, reshuffle_each_iteration=False)
    # Skipping raw examples (before the decode/augment map) makes resume cheap.
    examples = examples.take(steps_per_epoch * global_batch_size).skip(
        tf.where(epoch == start_epoch, tf.constant(skip_batches * global_batch_size, tf.int64), 0)
    )
    if process_count > 1:  # this process' consecutive batch_size of every global batch
      examples = examples.enumerate().filter(
          lambda position, _: (position // batch_size) % process_count == process_index
      )
      examples = examples.map(lambda _, example: example)
    examples = examples.map(
        lambda example: augment(example, epoch),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    return examples.batch(batch_size, drop_remainder=True)

  epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
  dataset = epochs.flat_map(epoch_dataset)
  options = tf.data.Options()
  options.deterministic = deterministic
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def eval_num_batches(num_examples, process_count, batch_size):
  """Batches per process so that every process yields the same count and all examples fit."""
  return max(1, math.ceil(math.ceil(num_examples / process_count) / batch_size))


def eval_dataset_from(source, num_examples, config, *, batch_size, num_batches):
  """The evaluation stream of one process: every example once, no augmentation, padded.

  The last batches are padded with copies of the first example with `valid` = 0 and
  `index` = -1 (finite values, so masked losses stay finite). config.data.eval_crop picks the
  crop: 'joints' (around the ground-truth 2D joints, as in training) or 'image' (the whole
  image: no ground truth enters the input, the protocol for FreiHAND's hand-centred images).

  Args:
    source: tf.data.Dataset of this process' examples.
    num_examples: the number of examples in `source` (> 0).
    config: the experiment config.
    batch_size: the per-process batch size.
    num_batches: batches to yield (`eval_num_batches`; equal on every process).
  """
  num_padding = num_batches * batch_size - num_examples
  if num_examples <= 0 or num_padding < 0:
    raise ValueError(
        f'{num_examples} examples do not fit {num_batches} batches of '
        f'{batch_size} (or none at all)'
    )
  eval_crop = config.data.eval_crop
  if eval_crop not in ('joints', 'image'):
    raise ValueError(f"config.data.eval_crop must be 'joints' or 'image', got {eval_crop!r}")
  examples = source.map(_select).map(
      lambda example: transform_example(example, config, whole_image=eval_crop == 'image'),
      num_parallel_calls=tf.data.AUTOTUNE,
  )
  padding = examples.take(1).map(
      lambda e: {**e, 'valid': tf.constant(0.0), 'index': tf.constant(-1, tf.int32)}
  )
  examples = examples.concatenate(padding.repeat(num_padding))
  return examples.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


# ---- Sources: TFDS builders from the config ----


def get_builder(config, need_train=True):
  """The prepared TFDS builder of `config.data.name` ('synthetic' | 'freihand' | 'dexycb' |
  'ho3d'); real data sets are prepared from config.data.root (manual_dir) on first use.

  need_train=False: only the evaluation split is read (the synthetic set then skips rendering
  a training split that is not there yet).
  """
  name = config.data.name
  if name == 'synthetic':
    return synthetic_hands.prepare(config, need_train=need_train)
  variant = 'depth' if config.model.use_depth else 'rgb'
  data_dir = config.data.tfds_data_dir
  if name == 'freihand':
    builder = freihand.Freihand(
        config=variant,
        data_dir=data_dir,
        skip_corrupt=bool(config.data.skip_corrupt),
    )
  elif name in ('dexycb', 'ho3d'):
    # Their vertices come from the MANO parameters: the real MANO files are needed.
    if not config.mano_path:
      raise ValueError(
          f'config.data.name={name!r} needs config.mano_path = the real '
          'MANO_RIGHT.pkl (MANO_LEFT.pkl beside it for DexYCB)'
      )
    mano_dir = os.path.dirname(os.path.abspath(config.mano_path))
    if name == 'dexycb':
      builder = dexycb.Dexycb(config=variant, data_dir=data_dir, mano_dir=mano_dir)
    else:
      builder = ho3d.Ho3d(config=variant, data_dir=data_dir, mano_dir=mano_dir)
  else:
    raise ValueError(
        f"unknown config.data.name {name!r} (known: 'synthetic', 'freihand', " "'dexycb', 'ho3d')"
    )
  if not builder.is_prepared():
    if not config.data.root:
      raise ValueError(
          f'config.data.root must point to the {name} files (manual_dir) to '
          f'prepare the {name} data set in {data_dir}'
      )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=config.data.root)
    )
  return builder


def read_split(builder, split, *, process_index=None, process_count=None):
  """This process' even share of `split`: (tf.data.Dataset of undecoded examples, size)."""
  process_split = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count
  )
  skipped = {
      key: tfds.decode.SkipDecoding() for key in ('image', 'mask') if key in builder.info.features
  }
  dataset = builder.as_dataset(split=process_split, decoders=skipped, shuffle_files=False)
  return dataset, builder.info.splits[process_split].num_examples


def _per_process(global_batch_size, what):
  if global_batch_size % jax.process_count():
    raise ValueError(
        f'{what} {global_batch_size} is not divisible by the ' f'{jax.process_count()} processes'
    )
  return global_batch_size // jax.process_count()


def train_split_size(config) -> int:
  """Examples in the prepared training split (the builder counted them from the files)."""
  return int(get_builder(config).info.splits['train'].num_examples)


def create_train_iterator(config, *, start_step=0, deterministic=True):
  """Iterator of numpy training batches of global_batch_size // process_count examples."""
  batch_size = _per_process(config.train.global_batch_size, 'config.train.global_batch_size')
  # Every process reads the whole split (cheap: undecoded) and keeps its share of each global
  # batch, so the global batches do not depend on the number of processes.
  source, num_examples = read_split(get_builder(config), 'train', process_index=0, process_count=1)
  dataset = train_dataset_from(
      source,
      num_examples,
      config,
      batch_size=batch_size,
      start_step=start_step,
      deterministic=deterministic,
  )
  return dataset.as_numpy_iterator()


class EvalBatches:
  """A re-iterable of numpy evaluation batches; len() = batches per process.

  Attributes:
    num_examples: real examples over all processes.
    has_targets: False when the split has no ground truth (FreiHAND evaluation without the
      annotation files): its target keys are zeros, so predict but do not score.
  """

  def __init__(self, dataset, num_batches, num_examples, has_targets=True):
    self.dataset, self.num_batches, self.num_examples = dataset, num_batches, num_examples
    self.has_targets = has_targets

  def __iter__(self):
    return self.dataset.as_numpy_iterator()

  def __len__(self):
    return self.num_batches


def create_eval_iterator(config, split='evaluation'):
  """Numpy batches covering `split` (or its first config.eval.num_examples) exactly once.

  Every process yields the same number of batches; padding has `valid` = 0.
  """
  batch_size = _per_process(config.eval.batch_size, 'config.eval.batch_size')
  builder = get_builder(config, need_train=split == 'train')
  total = builder.info.splits[split].num_examples
  if config.eval.num_examples > 0:
    total = min(total, int(config.eval.num_examples))
    split = f'{split}[:{total}]'
  num_batches = eval_num_batches(total, jax.process_count(), batch_size)
  source, num_examples = read_split(builder, split)
  dataset = eval_dataset_from(
      source, num_examples, config, batch_size=batch_size, num_batches=num_batches
  )
  has_targets = True
  if 'has_targets' in builder.info.features:  # one flag per split: read it off one example
    first = builder.as_dataset(
        split=split,
        decoders={'image': tfds.decode.SkipDecoding(), 'mask': tfds.decode.SkipDecoding()},
    )
    has_targets = bool(next(iter(first.take(1)))['has_targets'])
  return EvalBatches(dataset, num_batches, total, has_targets)
