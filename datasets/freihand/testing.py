"""Writes a tiny directory in the official FreiHAND layout (for tests, examples and demos)."""

import json
import pathlib

import numpy as np
from PIL import Image

from datasets.freihand import reader


def image_colour(image_id):
  """The uniform RGB colour of fake image `image_id` (survives JPEG compression to +-3)."""
  return np.array([(37 * image_id + 20) % 230, (11 * image_id + 60) % 230, 128], np.uint8)


def _annotations(rng, num, image_size):
  """Random but plausible annotations: hands 0.4-0.6 m in front of a 500 px (at 224) camera."""
  focal = 500.0 * image_size / 224.0
  K = np.zeros((num, 3, 3), np.float32)
  K[:, 0, 0] = focal * rng.uniform(0.95, 1.05, num)
  K[:, 1, 1] = focal * rng.uniform(0.95, 1.05, num)
  K[:, :2, 2] = image_size / 2 + rng.uniform(-3, 3, (num, 2))
  K[:, 2, 2] = 1
  centre = np.stack(
      [rng.uniform(-0.02, 0.02, num), rng.uniform(-0.02, 0.02, num), rng.uniform(0.4, 0.6, num)], -1
  )
  xyz = (centre[:, None] + rng.normal(0, 0.03, (num, reader.NUM_JOINTS, 3))).astype(np.float32)
  verts = centre[:, None] + rng.normal(0, 0.03, (num, reader.NUM_VERTICES, 3))
  mano = rng.normal(0, 0.5, (num, 1, reader.MANO_PARAMS)).astype(np.float32)
  scale = np.linalg.norm(xyz[:, 9] - xyz[:, 10], axis=-1)
  return {'K': K, 'xyz': xyz, 'verts': verts.astype(np.float32), 'mano': mano, 'scale': scale}


def _write_json(path, array):
  with open(path, 'w') as f:
    json.dump(np.asarray(array).tolist(), f)


def _write_jpeg(path, colour, size, rng=None):
  """A uniform image, or with rng a textured one (photo-like JPEG decoding cost)."""
  image = np.broadcast_to(colour, (size, size, 3)).astype(np.float32)
  if rng is not None:
    coarse = rng.normal(0, 40, (size // 8 + 1, size // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)
    image = image + coarse[:size, :size] + rng.normal(0, 8, (size, size, 3))
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=95)


def write_layout(
    root, num_train=3, num_eval=2, *, image_size=32, eval_annotations=True, seed=0, textured=False
):
  """Writes a FreiHAND-layout directory and returns the annotations written.

  Every RGB image is uniformly coloured with `image_colour(image_id)` (plus noise when
  `textured`, for benchmarks); the masks hold a square.

  Args:
    root: the directory to fill (created).
    num_train: unique training annotations (x 4 versions of images).
    num_eval: evaluation images.
    image_size: the square image side in pixels.
    eval_annotations: also write evaluation_{xyz,verts,mano}.json.
    seed: the numpy seed of the annotations.
    textured: add smooth and fine noise to the images.

  Returns:
    {'training': {...}, 'evaluation': {...}}: the arrays of each JSON file, [N,...] float32
    (mano as [N,1,61], the nesting of the real files).
  """
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  written = {}
  for prefix, num, versions in (
      ('training', num_train, reader.VERSIONS),
      ('evaluation', num_eval, ('gs',)),
  ):
    annotations = _annotations(rng, num, image_size)
    names = ('K', 'xyz', 'verts', 'mano', 'scale')
    if prefix == 'evaluation' and not eval_annotations:
      names = ('K', 'scale')
    for name in names:
      _write_json(root / f'{prefix}_{name}.json', annotations[name])
    written[prefix] = {name: annotations[name] for name in names}
    (root / prefix / 'rgb').mkdir(parents=True, exist_ok=True)
    for version_index in range(len(versions)):
      for idx in range(num):
        image_id = idx + num * version_index
        _write_jpeg(
            root / prefix / 'rgb' / f'{image_id:08d}.jpg',
            image_colour(image_id),
            image_size,
            rng if textured else None,
        )
    if prefix == 'training':
      (root / prefix / 'mask').mkdir(exist_ok=True)
      mask = np.zeros((image_size, image_size), np.uint8)
      mask[image_size // 4 : 3 * image_size // 4, image_size // 4 : 3 * image_size // 4] = 255
      for idx in range(num):
        Image.fromarray(mask).save(root / prefix / 'mask' / f'{idx:08d}.jpg', quality=95)
  return written
