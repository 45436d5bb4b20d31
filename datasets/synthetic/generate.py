"""Synthetic rendered hand examples (numpy, no TensorFlow).

An example is a pure function of (seed, stream, index): `np.random.default_rng([seed, stream,
index])` drives every random choice in a fixed order, so the same seed gives the same data set
on any machine and any example can be made on its own (no sequential state). `stream` keeps
splits apart: the training split uses TRAIN_STREAM, the evaluation split EVAL_STREAM.

Recipe: sample a pose, a shape and a global rotation (by default as people hold a hand up to
a camera); pose the hand with `mano_forward`;
mirror it into a left hand half of the time (x -> -x in the camera frame, faces re-oriented);
sample a camera and a placement that keeps the whole hand inside the image; render it with a
random skin tone (lighter palm, nails, faint texture) and light over a random background; maybe paint an occluder.

Occluders are image-only distractors: `mask` and `depth` are those of the hand as the camera
would see it without the occluder (the hand's own self-occlusion is in them, the occluder is
not), so supervision stays the hand's.
"""

import functools

import jax
import numpy as np

from datasets.synthetic import appearance
from datasets.synthetic import sampler
from diffhand_jax import mano
from diffhand_jax import render

_MIRROR = np.array([-1.0, 1.0, 1.0])
MIN_IMAGE_SIZE = 16
TRAIN_STREAM = 0
EVAL_STREAM = 1


@functools.partial(jax.jit, static_argnames='tip_ids')
def _forward(hand_model, pose, betas, tip_ids):
  return mano.mano_forward(hand_model, pose, betas, tip_ids=tip_ids)


def _check_arguments(seed, index, image_size, stream):
  for name, value in (
      ('seed', seed),
      ('index', index),
      ('image_size', image_size),
      ('stream', stream),
  ):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise ValueError(f'{name} must be an integer, got {value!r}')
  if seed < 0 or index < 0 or stream < 0:
    raise ValueError(
        f'seed, index and stream must be non-negative, got seed={seed}, '
        f'index={index}, stream={stream}'
    )
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f'image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}')


_THUMB_JOINTS = (13, 14, 15)
_FACTS_CACHE = {}  # (id(hand_model), tip_ids) -> (hand_model, facts); models are not hashable


def _model_facts(hand_model, tip_ids):
  """(JointFrames, SkinRegions) of a hand model, measured once on its rest pose."""
  key = (id(hand_model), tuple(tip_ids))
  cached = _FACTS_CACHE.get(key)
  if cached is not None and cached[0] is hand_model:
    return cached[1]
  frames = sampler.joint_frames(hand_model, tip_ids)
  thumb_vertices = np.asarray(hand_model.weights)[:, _THUMB_JOINTS].sum(axis=1) > 0.5
  regions = appearance.skin_regions(
      hand_model.v_template,
      hand_model.faces,
      frames.palm_normal,
      frames.thumb_palmar,
      tip_ids,
      thumb_vertices,
  )
  if len(_FACTS_CACHE) > 8:
    _FACTS_CACHE.clear()
  _FACTS_CACHE[key] = (hand_model, (frames, regions))
  return frames, regions


def sample_geometry(hand_model, rng, image_size, tip_ids=mano.TIP_VERTEX_IDS, orientation='held'):
  """Samples a posed hand and a camera that sees all of it.

  Args:
    hand_model: a `mano.ManoModel` (right hand).
    rng: numpy Generator (consumed in a fixed order).
    image_size: image side in pixels.
    tip_ids: fingertip vertex ids.
    orientation: 'held' (as people hold a hand up to a camera) or 'uniform'
      (`sampler.ORIENTATIONS`).

  Returns:
    dict: pose [48] (hands_mean not added), betas [10], is_right bool, K [3, 3],
    verts [778, 3], joints3d [21, 3] (camera frame, metres, float64), faces [1538, 3]
    (re-oriented for left hands).
  """
  frames, _ = _model_facts(hand_model, tuple(tip_ids))
  articulation = sampler.sample_articulation(rng, frames)
  betas = sampler.sample_betas(rng)
  global_orient = sampler.sample_orientation(rng, frames, orientation)
  is_right = bool(rng.uniform() < 0.5)
  K = sampler.sample_intrinsics(rng, image_size)
  # The stored pose follows MANO's convention: hands_mean is added back by mano_forward.
  hand_pose = articulation.ravel() - np.asarray(hand_model.hands_mean, np.float64)
  pose = np.concatenate([global_orient, hand_pose])
  verts, joints = _forward(
      hand_model, pose[None].astype(np.float32), betas[None].astype(np.float32), tuple(tip_ids)
  )
  verts = np.asarray(verts[0], np.float64)
  joints = np.asarray(joints[0], np.float64)
  root = joints[0]
  verts, joints = verts - root, joints - root
  faces = np.asarray(hand_model.faces)
  if not is_right:
    # Mirroring flips orientation: reversing each triangle keeps the normals outward.
    verts, joints, faces = verts * _MIRROR, joints * _MIRROR, faces[:, ::-1]
  translation = sampler.place_in_view(rng, verts, K, image_size)
  return {
      'pose': pose,
      'betas': betas,
      'is_right': is_right,
      'K': K,
      'verts': verts + translation,
      'joints3d': joints + translation,
      'faces': np.ascontiguousarray(faces),
  }


def render_appearance(rng, geometry, image_size, regions):
  """Renders a sampled hand with random skin, light, background and maybe an occluder.

  Args:
    rng: numpy Generator.
    geometry: the dict of `sample_geometry`.
    image_size: image side in pixels.
    regions: `appearance.SkinRegions` of the hand model (palm, nails, texture).

  Returns:
    (image uint8 [S, S, 3], depth float32 [S, S], mask bool [S, S]).
  """
  skin = appearance.sample_vertex_albedo(rng, appearance.sample_skin(rng), regions)
  light, ambient = appearance.sample_light(rng)
  background = appearance.background_texture(rng, image_size)
  raster = render.rasterize(
      geometry['verts'], geometry['faces'], geometry['K'], image_size, image_size
  )
  image = render.shade(
      raster,
      geometry['verts'],
      geometry['faces'],
      color=skin,
      light_dir=light,
      ambient=ambient,
      background=background,
  )
  mask = raster.face_index >= 0
  occluder = appearance.occluder_mask(rng, image_size, mask)
  if occluder is not None:
    image[occluder] = appearance.occluder_texture(rng, image_size)[occluder]
  return render.to_uint8(appearance.add_noise(rng, image)), raster.depth, mask


def make_example(
    hand_model,
    seed,
    index,
    image_size,
    tip_ids=mano.TIP_VERTEX_IDS,
    stream=TRAIN_STREAM,
    orientation='held',
):
  """One synthetic example, a pure function of (hand_model, seed, stream, index, image_size).

  Args:
    hand_model: a `mano.ManoModel` (right hand).
    seed: non-negative int, the data set's seed.
    index: non-negative int, the example's index within the data set.
    image_size: image side S in pixels.
    tip_ids: fingertip vertex ids.
    stream: random stream (TRAIN_STREAM / EVAL_STREAM keep the splits apart).
    orientation: global orientation distribution ('held' | 'uniform', see sample_geometry).

  Returns:
    dict in the format of `datasets/features.py`: image uint8 [S, S, 3], depth float32
    [S, S, 1], mask uint8 [S, S, 1] (255 = hand), K float32 [3, 3], joints3d float32 [21, 3],
    joints2d float32 [21, 2], verts float32 [778, 3], pose float32 [48], betas float32 [10],
    is_right bool, id int64 (= index). For a left hand (is_right False), pose and betas
    describe the right hand whose mirror image (x -> -x, camera frame) is shown.
  """
  _check_arguments(seed, index, image_size, stream)
  rng = np.random.default_rng([seed, stream, index])
  geometry = sample_geometry(hand_model, rng, image_size, tip_ids, orientation)
  _, regions = _model_facts(hand_model, tuple(tip_ids))
  image, depth, mask = render_appearance(rng, geometry, image_size, regions)
  K = geometry['K'].astype(np.float32)
  joints3d = geometry['joints3d'].astype(np.float32)
  return {
      'image': image,
      'depth': depth[..., None].astype(np.float32),
      'mask': (mask[..., None] * 255).astype(np.uint8),
      'K': K,
      'joints3d': joints3d,
      # Projected from the stored float32 values so the two agree to rounding.
      'joints2d': render.project_points(joints3d, K).astype(np.float32),
      'verts': geometry['verts'].astype(np.float32),
      'pose': geometry['pose'].astype(np.float32),
      'betas': geometry['betas'].astype(np.float32),
      'is_right': geometry['is_right'],
      'id': np.int64(index),
  }


def examples(
    hand_model,
    seed,
    start,
    count,
    image_size,
    tip_ids=mano.TIP_VERTEX_IDS,
    stream=TRAIN_STREAM,
    orientation='held',
):
  """Yields `make_example(hand_model, seed, i, ...)` for i in [start, start + count).

  Args:
    hand_model: a `mano.ManoModel`.
    seed: the data set's seed.
    start: first example index.
    count: number of examples.
    image_size: image side in pixels.
    tip_ids: fingertip vertex ids.
    stream: random stream (TRAIN_STREAM / EVAL_STREAM).
    orientation: 'held' | 'uniform' (see sample_geometry).
  """
  if start < 0 or count < 0:
    raise ValueError(f'start and count must be non-negative, got start={start}, count={count}')
  for index in range(start, start + count):
    yield make_example(hand_model, seed, index, image_size, tip_ids, stream, orientation)
