"""`--mode=predict`: hand meshes for a folder of images (or one image).

For every readable image `<stem>.<ext>` it writes, under `<workdir>/predictions` by default:
- `<stem>.obj`: the mesh in the camera frame of the input image (metres);
- `<stem>_overlay.png`: the mesh and the 21 joints drawn over the input image;
- `<stem>.json`: the numbers (keys and shapes in `JSON_KEYS`; lengths in metres).

Choices, written down:
- Crop: the largest centred square of the image, resized to config.data.image_size
  (`input_pipeline.preprocess_image`, the training normalisation). The hand should fill it.
- Intrinsics: user images come without K, so a pinhole camera is assumed: principal point at
  the image centre ((W - 1) / 2, (H - 1) / 2; pixel centres on integers) and focal length
  config.predict.focal_length_224 (500 px in configs/synthetic.py, FreiHAND-like) at a 224 px
  crop, scaled with the crop side min(H, W). The crop only scales and shifts pixels, so the crop
  camera and the image camera share one frame: the camera-frame mesh drawn with the image's K
  lands on the image. Its absolute depth is as good as this focal-length guess (the relative
  shape is not affected).
- Images are assumed to show a right hand (training mirrors left hands to right ones).
- Sampling: `evaluate.make_sample_fn` (config.sampling.*, config.eval.tta_angles) on one
  device (parameters from `checkpointing.restore_params`, whatever topology trained them), noise
  from PRNGKey(config.seed) folded with the batch number: the same checkpoint and images always
  give the same meshes. Per-vertex uncertainty `vertex_std` is the RMS distance of the
  config.sampling.num_hypotheses samples to their mean (0 when K = 1).
- Unreadable files with an image extension are reported and skipped; other files are ignored.
  Nothing already written is replaced unless `overwrite=True`: all output paths are checked
  before any work starts.
"""

import json
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageOps

from diffhand_jax import checkpointing
from diffhand_jax import evaluate
from diffhand_jax import input_pipeline
from diffhand_jax import mesh
from diffhand_jax import models
from diffhand_jax import procedural_mano
from diffhand_jax import render

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
# Larger images are decoded downscaled where the format allows it (JPEG), else refused: the
# network sees a crop of config.data.image_size px, and an 8000 x 8000 image took 5.7 GB.
MAX_IMAGE_PIXELS = 4096 * 4096
OUTPUT_SUBDIR = 'predictions'
# Keys of each <stem>.json; V = number of mesh vertices (778), shapes per image.
JSON_KEYS = {
    'image': 'path of the input image',
    'image_size': '[2] (height, width) pixels',
    'intrinsics': '[3, 3] assumed K of the input image (see the module docstring)',
    'crop_intrinsics': '[3, 3] K of the network crop',
    'camera': '[3] predicted weak-perspective camera (s, tx, ty) of the crop',
    'root': '[3] wrist position in the camera frame, metres',
    'joints': '[21, 3] root-relative joints (wrist = 0), metres, FreiHAND order',
    'vertices': '[V, 3] root-relative vertices, metres',
    'joints_camera': '[21, 3] camera-frame joints, metres',
    'vertices_camera': '[V, 3] camera-frame vertices, metres (the .obj)',
    'joints2d': '[21, 2] joints projected into the input image, pixels (null when the mesh '
    'is not in front of the camera)',
    'vertex_std': '[V] per-vertex uncertainty, metres (RMS over the hypotheses)',
    'num_hypotheses': 'int, samples per image',
    'num_sampling_steps': 'int, DDIM steps',
    'noise_scale': 'float, standard deviation of the starting noise x_T',
}


def list_images(input_path: str) -> list[str]:
  """The image files to process: `input_path` itself, or the images in that folder (sorted).

  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: a folder without image files, or a single file without an image extension.
  """
  if not os.path.exists(input_path):
    raise FileNotFoundError(f'predict input {input_path!r} does not exist')
  if os.path.isdir(input_path):
    paths = sorted(
        os.path.join(input_path, name)
        for name in os.listdir(input_path)
        if name.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(input_path, name))
    )
    if not paths:
      raise ValueError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in {input_path!r}')
    return paths
  if not input_path.lower().endswith(IMAGE_EXTENSIONS):
    raise ValueError(f'{input_path!r} is not an image file ({", ".join(IMAGE_EXTENSIONS)})')
  return [input_path]


def output_paths(output_dir: str, image_path: str) -> dict:
  """{'obj', 'overlay', 'json'} output files of one image."""
  stem = os.path.splitext(os.path.basename(image_path))[0]
  return {
      'obj': os.path.join(output_dir, f'{stem}.obj'),
      'overlay': os.path.join(output_dir, f'{stem}_overlay.png'),
      'json': os.path.join(output_dir, f'{stem}.json'),
  }


def read_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] RGB, EXIF orientation applied.

  An image of more than MAX_IMAGE_PIXELS is decoded downscaled (by 2, 4 or 8) to at most that
  many pixels where its format can (JPEG); otherwise it is refused before it is decoded.

  Raises:
    ValueError: the file is not a readable image, or too large (the message names it and says
      why).
  """
  try:
    with Image.open(path) as image:
      width, height = image.size
      if width * height > MAX_IMAGE_PIXELS:
        # JPEG decodes at 1/2, 1/4 or 1/8 scale: the largest that is at least the size asked.
        scale = 2 ** math.ceil(math.log2((width * height / MAX_IMAGE_PIXELS) ** 0.5))
        image.draft(image.mode, (math.ceil(width / scale), math.ceil(height / scale)))
        if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:
          raise ValueError(
              f'image of {width} x {height} pixels is larger than predict reads '
              f'({MAX_IMAGE_PIXELS} pixels, e.g. 4096 x 4096) and its format cannot be decoded '
              'downscaled: resize it first'
          )
      image = ImageOps.exif_transpose(image)
      return np.asarray(image.convert('RGB'), dtype=np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    # PIL signals unreadable / truncated files with OSError (UnidentifiedImageError is one)
    # and some corrupt headers with SyntaxError or ValueError.
    raise ValueError(f'cannot read image {path!r}: {error}') from error


def assumed_intrinsics(height: int, width: int, focal_length_224: float) -> np.ndarray:
  """[3, 3] K of an image without calibration (see the module docstring)."""
  focal = focal_length_224 * min(height, width) / 224.0
  return np.array(
      [[focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0], [0.0, 0.0, 1.0]],
      np.float32,
  )


def _focal_length_224(config):
  focal = float(config.predict.focal_length_224)
  if not np.isfinite(focal) or focal <= 0:
    raise ValueError(f'config.predict.focal_length_224 must be positive, got {focal}')
  return focal


def _check_outputs_free(jobs, overwrite):
  """Refuses, before any work, to replace an existing output file."""
  if overwrite:
    return
  for _, paths in jobs:
    for path in paths.values():
      if os.path.exists(path):
        raise FileExistsError(
            f'{path} exists; pass overwrite=True (--overwrite) to replace it, or choose '
            'another output folder'
        )


def _drawing(image, K, vertices_camera, joints_camera, faces):
  """The overlay image, or the plain image when the placement cannot be drawn."""
  if not (np.all(np.isfinite(vertices_camera)) and np.all(vertices_camera[:, 2] > 0)):
    return image, None
  overlay = render.overlay_mesh(image, vertices_camera, faces, K)
  joints2d = render.project_points(joints_camera, K)
  return render.draw_skeleton(overlay, joints2d), joints2d


def _write_result(paths, record, image, faces):
  """Writes the .obj, the overlay PNG and the JSON of one image."""
  overlay, joints2d = _drawing(
      image, record['intrinsics'], record['vertices_camera'], record['joints_camera'], faces
  )
  record['joints2d'] = joints2d
  mesh.save_obj(paths['obj'], record['vertices_camera'], faces)
  Image.fromarray(overlay).save(paths['overlay'])
  serialisable = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in record.items()}
  with open(paths['json'], 'w') as f:
    json.dump(serialisable, f)


def _check_predictable(config):
  """Refuses a config this mode cannot serve (depth-conditioned models)."""
  if config.model.use_depth:
    raise ValueError(
        '--mode=predict does not support depth-conditioned models '
        '(config.model.use_depth=True): user images come without depth maps'
    )


def _plan_outputs(input_path, output_dir, overwrite):
  """The images to read and where each one's outputs go, checked before any work.

  Args:
    input_path: an image file or a folder of images.
    output_dir: the output folder.
    overwrite: whether existing output files may be replaced.

  Returns:
    [(image path, `output_paths` dict)], one per image file, sorted.

  Raises:
    ValueError: two images share a file stem (their outputs would collide).
    FileExistsError: an output file exists and `overwrite` is False.
  """
  jobs = [(path, output_paths(output_dir, path)) for path in list_images(input_path)]
  stems = [os.path.basename(paths['json']) for _, paths in jobs]
  if len(set(stems)) != len(stems):
    raise ValueError(
        f'images in {input_path!r} share a file stem (e.g. a.jpg and a.png): '
        'their outputs would collide'
    )
  _check_outputs_free(jobs, overwrite)
  return jobs


def _read_inputs(jobs, focal_length_224, image_size, skipped):
  """Reads and crops each image in turn; reports and skips the unreadable ones.

  Args:
    jobs: [(image path, `output_paths` dict)].
    focal_length_224: the assumed focal length at a 224 px crop.
    image_size: the network's crop side, pixels.
    skipped: a list that receives (image path, reason) per unreadable image.

  Yields:
    One dict per readable image: 'path', 'paths', 'number' (1-based in `jobs`), 'image' uint8
    [H, W, 3], 'K' [3, 3] its assumed intrinsics, 'crop' [S, S, 3] the network input and
    'crop_K' [3, 3] the crop's intrinsics (S = image_size).
  """
  for number, (path, paths) in enumerate(jobs, start=1):
    try:
      image = read_image(path)
    except ValueError as error:
      skipped.append((path, str(error)))
      print(f'[{number}/{len(jobs)}] skipped: {error}', flush=True)
      continue
    K = assumed_intrinsics(image.shape[0], image.shape[1], focal_length_224)
    crop, crop_K = input_pipeline.preprocess_image(image, image_size, K=K)
    yield {
        'path': path,
        'paths': paths,
        'image': image,
        'K': K,
        'crop': crop,
        'crop_K': crop_K,
        'number': number,
    }


def _batches(items, batch_size):
  """Groups an iterable into lists of batch_size (the last one may be shorter)."""
  pending = []
  for item in items:
    pending.append(item)
    if len(pending) == batch_size:
      yield pending
      pending = []
  if pending:
    yield pending


def _sample_batch(sample_fn, params, pending, batch_size, rng):
  """Samples the meshes of one batch, padded to batch_size (one compilation).

  Args:
    sample_fn: `evaluate.make_sample_fn`'s sampler.
    params: the model's 'params' collection, on one device.
    pending: B <= batch_size dicts from `_read_inputs`.
    batch_size: the padded batch size N.
    rng: the PRNG key of this batch.

  Returns:
    The sampler's outputs on the host, [N, ...] each; rows past B are padding.
  """
  crops = np.stack([item['crop'] for item in pending])
  crop_K = np.stack([item['crop_K'] for item in pending])
  pad = batch_size - len(pending)
  crops = np.concatenate([crops, np.repeat(crops[-1:], pad, axis=0)])
  crop_K = np.concatenate([crop_K, np.repeat(crop_K[-1:], pad, axis=0)])
  return jax.device_get(sample_fn(params, jnp.asarray(crops), rng, None, jnp.asarray(crop_K)))


def _result_record(item, out, row, sampling):
  """The JSON record of one image (keys in `JSON_KEYS`, less 'joints2d').

  Args:
    item: the image's dict from `_read_inputs`.
    out: the batch's sampler outputs from `_sample_batch`.
    row: the image's row in `out`.
    sampling: config.sampling.

  Returns:
    A dict of numpy arrays and numbers.
  """
  joints_camera = np.asarray(out['joints_camera'][row], np.float64)
  return {
      'image': item['path'],
      'image_size': list(item['image'].shape[:2]),
      'intrinsics': item['K'],
      'crop_intrinsics': item['crop_K'],
      'camera': np.asarray(out['camera'][row]),
      'root': joints_camera[0],  # the sampler's joints are wrist-relative
      'joints': np.asarray(out['joints'][row]),
      'vertices': np.asarray(out['vertices'][row]),
      'joints_camera': joints_camera,
      'vertices_camera': np.asarray(out['vertices_camera'][row]),
      'vertex_std': np.asarray(out['vertex_std'][row]),
      'num_hypotheses': int(sampling.num_hypotheses),
      'num_sampling_steps': int(sampling.num_sampling_steps),
      'noise_scale': float(sampling.get('noise_scale', 1.0)),
  }


def _write_batch(pending, out, sampling, faces, total):
  """Writes the outputs of one sampled batch and reports each image.

  Args:
    pending: the batch's dicts from `_read_inputs`.
    out: their sampler outputs from `_sample_batch`.
    sampling: config.sampling.
    faces: [F, 3] int mesh faces.
    total: the number of input images (for the progress lines).

  Returns:
    The JSON paths written, in batch order.
  """
  written = []
  for row, item in enumerate(pending):
    record = _result_record(item, out, row, sampling)
    _write_result(item['paths'], record, item['image'], faces)
    written.append(item['paths']['json'])
    note = '' if record['joints2d'] is not None else ' (mesh behind the camera: not drawn)'
    print(f'[{item["number"]}/{total}] {item["path"]} -> {item["paths"]["json"]}{note}', flush=True)
  return written


def predict(
    config: ml_collections.ConfigDict,
    workdir: str,
    input_path: str,
    *,
    overwrite: bool = False,
    params: Optional[Any] = None,
    output_dir: Optional[str] = None,
) -> dict:
  """Reconstructs a hand mesh for each image of `input_path` and writes the results.

  Args:
    config: the experiment config (model, sampling, data.image_size, predict.*).
    workdir: the run directory; parameters come from its latest checkpoint unless `params`
      is given, and outputs go to `<workdir>/predictions` unless `output_dir` is given.
    input_path: an image file or a folder of images.
    overwrite: replace existing output files (otherwise their existence is an error).
    params: the model's 'params' collection (skips the checkpoint).
    output_dir: where to write (default `<workdir>/predictions`).

  Returns:
    {'output_dir': str, 'written': [json paths], 'skipped': [(image path, reason)]}.

  Raises:
    FileNotFoundError: missing input, or no checkpoint in `workdir` when `params` is None.
    FileExistsError: an output file exists and `overwrite` is False.
    ValueError: no images, or a config this mode cannot serve (depth-conditioned models).
  """
  _check_predictable(config)
  output_dir = output_dir or os.path.join(workdir, OUTPUT_SUBDIR)
  jobs = _plan_outputs(input_path, output_dir, overwrite)
  focal_length_224 = _focal_length_224(config)
  if params is None:
    params = checkpointing.restore_params(workdir)
  # On one device, once: the jitted sampler would otherwise copy host params in every batch.
  params = jax.device_put(params, jax.local_devices()[0])
  os.makedirs(output_dir, exist_ok=True)

  model = models.build_model(config)
  faces = np.asarray(procedural_mano.load_hand_model(config).faces)
  sample_fn = evaluate.make_sample_fn(model, config)
  # Every batch is padded to this size (one compilation); no bigger than the input needs.
  batch_size = max(1, min(int(config.eval.batch_size), len(jobs)))
  base_rng = jax.random.PRNGKey(config.seed)
  written, skipped = [], []
  inputs = _read_inputs(jobs, focal_length_224, int(config.data.image_size), skipped)
  for batch_number, pending in enumerate(_batches(inputs, batch_size)):
    rng = jax.random.fold_in(base_rng, batch_number)
    out = _sample_batch(sample_fn, params, pending, batch_size, rng)
    written += _write_batch(pending, out, config.sampling, faces, len(jobs))
  print(
      f'Predicted {len(written)} image(s) into {output_dir}; skipped {len(skipped)} '
      'unreadable file(s)' + ''.join(f'\n  {reason}' for _, reason in skipped),
      flush=True,
  )
  return {'output_dir': output_dir, 'written': written, 'skipped': skipped}
