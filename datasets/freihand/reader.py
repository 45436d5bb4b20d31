"""Reads FreiHAND from its official on-disk layout into plain numpy examples (no TensorFlow).

Layout (see /work/shared/docs/FREIHAND.md): `<root>/training_{K,mano,xyz,verts,scale}.json`,
`<root>/training/rgb/%08d.jpg` (4 versions per annotation), `<root>/training/mask/%08d.jpg`,
`<root>/evaluation_{K,scale}.json`, `<root>/evaluation/rgb/%08d.jpg`, and optionally
`<root>/evaluation_{xyz,verts,mano}.json`.

The number of annotations N is read from `<split>_K.json`; every other annotation file must have
N entries. Image id = idx + N * version_index, so small copies in the same layout work as well.

Evaluation without annotations: examples carry `has_targets = False` and simply do not contain
the keys whose files are absent (`joints3d`, `joints2d`, `verts`, `pose`, `betas`); consumers
that need a fixed schema (the TFDS builder) fill them with zeros and keep `has_targets`.
"""

import json
import logging
import os
import pathlib
import warnings

import numpy as np
from PIL import Image

VERSIONS = ('gs', 'hom', 'sample', 'auto')
SPLITS = {'training': 'training', 'train': 'training', 'evaluation': 'evaluation'}
NUM_JOINTS = 21
NUM_VERTICES = 778
MANO_PARAMS = 61


class CorruptFileError(ValueError):
  """A FreiHAND file exists but cannot be decoded (truncated JPEG, bad PNG/npy, NaN...)."""


def _load_json_array(path, entry_shape, num_entries=None, count_source=None):
  """Loads a JSON list of per-sample arrays as float32 [num_entries, *entry_shape].

  Args:
    path: the JSON file.
    entry_shape: the shape of one entry; () for scalars.
    num_entries: the expected list length, or None to accept any.
    count_source: the file `num_entries` was read from (for the error message).

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: the file is not JSON, has the wrong length, shape or non-finite values.
  """
  if not path.is_file():
    raise FileNotFoundError(f'FreiHAND annotation file missing: {path}')
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e
  if not isinstance(data, list):
    raise ValueError(f'{path}: expected a JSON list, got {type(data).__name__}')
  if num_entries is not None and len(data) != num_entries:
    raise ValueError(
        f'{path}: {len(data)} entries, expected {num_entries} '
        f'(the number of entries in {count_source})'
    )
  try:
    array = np.asarray(data, dtype=np.float32)
  except ValueError as e:
    raise ValueError(f'{path}: entries are not all arrays of shape {entry_shape} ({e})') from e
  # mano entries are nested as [[61 floats]]: a leading singleton axis per entry is allowed.
  if array.ndim == len(entry_shape) + 2 and array.shape[1] == 1:
    array = array[:, 0]
  if array.shape[1:] != tuple(entry_shape):
    raise ValueError(f'{path}: entries have shape {array.shape[1:]}, expected {tuple(entry_shape)}')
  if not np.all(np.isfinite(array)):
    raise ValueError(f'{path}: contains NaN or infinite values')
  return array


def load_annotations(root, split):
  """Loads the annotation JSON files of a split.

  Args:
    root: the FreiHAND root (where `training/` and `evaluation/` branch off).
    split: 'training' (alias 'train') or 'evaluation'.

  Returns:
    dict with 'K' [N,3,3], 'scale' [N], and when present 'xyz' [N,21,3], 'verts' [N,778,3],
    'mano' [N,61] (all float32). Training requires every file; evaluation only K and scale.
  """
  prefix = _split_dir(split)
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f'FreiHAND root directory not found: {root}')
  k_path = root / f'{prefix}_K.json'
  annotations = {'K': _load_json_array(k_path, (3, 3))}
  num = len(annotations['K'])
  if num == 0:
    raise ValueError(f'{k_path}: empty list, expected one 3x3 matrix per sample')
  entry_shapes = {
      'scale': (),
      'xyz': (NUM_JOINTS, 3),
      'verts': (NUM_VERTICES, 3),
      'mano': (MANO_PARAMS,),
  }
  required = ('scale', 'xyz', 'verts', 'mano') if prefix == 'training' else ('scale',)
  for name, shape in entry_shapes.items():
    path = root / f'{prefix}_{name}.json'
    if name in required or path.exists():
      annotations[name] = _load_json_array(path, shape, num, k_path.name)
  return annotations


def _split_dir(split):
  if split not in SPLITS:
    raise ValueError(f'unknown FreiHAND split {split!r} (known: {sorted(SPLITS)})')
  return SPLITS[split]


def project(K, points):
  """Pinhole projection. Args: K: [3,3]; points: [P,3] camera frame. Returns: [P,2] pixels."""
  uvw = points @ K.T
  return uvw[:, :2] / uvw[:, 2:]


def _read_image(path, mode):
  """Reads an image file fully (a truncated JPEG fails here, not later) as uint8 [H,W,C]."""
  if not path.is_file():
    raise FileNotFoundError(f'FreiHAND image missing: {path}')
  try:
    with Image.open(path) as image:
      image.load()
      return np.asarray(image.convert(mode))
  except (OSError, SyntaxError, ValueError) as e:
    raise CorruptFileError(f'corrupt or truncated image {path}: {e}') from e


def _read_depth(depth_dir, relative_image_path, image_shape):
  """Reads a depth map as float32 [H,W,1] metres from a .png (uint16 mm) or .npy (metres)."""
  stem = pathlib.Path(depth_dir) / relative_image_path.with_suffix('')
  png, npy = stem.with_suffix('.png'), stem.with_suffix('.npy')
  if png.is_file():
    if not png.stat().st_size:
      raise CorruptFileError(f'corrupt depth map {png}: empty file')
    try:
      with Image.open(png) as image:
        image.load()
        depth = np.asarray(image, dtype=np.float32) / 1000.0
    except (OSError, SyntaxError, ValueError) as e:
      raise CorruptFileError(f'corrupt depth map {png}: {e}') from e
    path = png
  elif npy.is_file():
    try:
      depth = np.load(npy, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError, EOFError) as e:
      raise CorruptFileError(f'corrupt depth map {npy}: {e}') from e
    path = npy
  else:
    raise FileNotFoundError(f'depth map missing: neither {png} nor {npy} exists')
  if depth.ndim == 3 and depth.shape[-1] == 1:
    depth = depth[..., 0]
  if depth.shape != tuple(image_shape[:2]):
    raise ValueError(
        f'{path}: depth shape {depth.shape} does not match the image ' f'{tuple(image_shape[:2])}'
    )
  if not np.all(np.isfinite(depth)):
    raise CorruptFileError(f'{path}: depth contains NaN or infinite values')
  return depth[..., None]


def examples(root, split, *, depth_dir=None, skip_corrupt=False, versions=None):
  """Yields FreiHAND examples as numpy dicts, in image-id order.

  Keys (datasets/features.py where they apply): image uint8 [H,W,3]; mask uint8 [H,W,1]
  (255 = hand, binarised from the JPEG; training, and evaluation when `evaluation/mask/`
  exists); K float32 [3,3]; joints3d [21,3] and verts [778,3] (metres, camera frame);
  joints2d [21,2] (pixels, projected with K); pose [48] and betas [10] (mano[:48], [48:58]);
  is_right True; id = image_id (int, unique within the split); version (str, one of VERSIONS);
  image_id; scale (float32); has_targets (bool); image_path (str); depth [H,W,1] metres when
  `depth_dir` is given (it mirrors the root: `<depth_dir>/training/rgb/%08d.png|.npy`).

  Args:
    root: the FreiHAND root directory.
    split: 'training' (alias 'train') or 'evaluation'.
    depth_dir: optional directory of depth maps, same relative names as the RGB images with
      .png (16-bit, millimetres) or .npy (float, metres).
    skip_corrupt: skip examples whose image/mask/depth cannot be decoded instead of raising;
      the number skipped is reported with a warning at the end.
    versions: the training versions to read (default all of VERSIONS); evaluation has 'gs' only.

  Raises:
    FileNotFoundError: a required file is missing (the message names it).
    CorruptFileError (a ValueError): a file cannot be decoded, unless skip_corrupt.
    ValueError: an annotation file has the wrong length/shape (names the file and the expected
      length), an unknown split or version.
  """
  prefix = _split_dir(split)
  if versions is None:
    versions = VERSIONS if prefix == 'training' else ('gs',)
  versions = tuple(versions)
  unknown = [v for v in versions if v not in VERSIONS]
  if unknown:
    raise ValueError(f'unknown FreiHAND versions {unknown} (known: {VERSIONS})')
  if prefix == 'evaluation' and versions != ('gs',):
    raise ValueError(f"FreiHAND evaluation images exist only in version 'gs', got {versions}")
  root = pathlib.Path(root)
  annotations = load_annotations(root, split)
  num = len(annotations['K'])
  has_targets = 'xyz' in annotations and 'verts' in annotations
  mask_dir = root / prefix / 'mask'
  with_mask = prefix == 'training' or mask_dir.is_dir()
  num_skipped = 0
  for version in versions:
    for idx in range(num):
      image_id = idx + num * VERSIONS.index(version)
      relative = pathlib.Path(prefix) / 'rgb' / f'{image_id:08d}.jpg'
      try:
        example = _example(
            root,
            relative,
            annotations,
            idx,
            depth_dir,
            mask_dir / f'{idx:08d}.jpg' if with_mask else None,
        )
      except CorruptFileError as e:
        if not skip_corrupt:
          raise
        num_skipped += 1
        logging.warning('skipping FreiHAND image %d: %s', image_id, e)
        continue
      example.update(id=image_id, image_id=image_id, version=version, has_targets=has_targets)
      yield example
  if num_skipped:
    message = f'FreiHAND {prefix}: skipped {num_skipped} corrupt file(s) under {root}'
    logging.warning(message)
    warnings.warn(message, stacklevel=2)


def _example(root, relative_image_path, annotations, idx, depth_dir, mask_path):
  """Reads the files of one image and attaches annotation entry `idx`."""
  image_path = root / relative_image_path
  image = _read_image(image_path, 'RGB')
  K = annotations['K'][idx]
  example = {
      'image': image,
      'K': K,
      'scale': annotations['scale'][idx],
      'is_right': True,
      'image_path': os.fspath(image_path),
  }
  if mask_path is not None:
    mask = _read_image(mask_path, 'L')
    # The masks are JPEGs: threshold away compression noise to the {0, 255} convention.
    example['mask'] = np.where(mask > 127, 255, 0).astype(np.uint8)[..., None]
  if 'xyz' in annotations:
    example['joints3d'] = annotations['xyz'][idx]
    example['joints2d'] = project(K, annotations['xyz'][idx]).astype(np.float32)
  if 'verts' in annotations:
    example['verts'] = annotations['verts'][idx]
  if 'mano' in annotations:
    example['pose'] = annotations['mano'][idx][:48]
    example['betas'] = annotations['mano'][idx][48:58]
  if depth_dir is not None:
    example['depth'] = _read_depth(depth_dir, relative_image_path, image.shape)
  return example


# Shared with the DexYCB and HO-3D readers (same image decoding and depth-map formats).
read_image = _read_image
read_depth = _read_depth
