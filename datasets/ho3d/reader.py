"""Reads HO-3D v2 from its official layout into plain numpy examples; writes the submission.

Layout (HO3D_v2 as released):
  <root>/train.txt, <root>/evaluation.txt     one `SEQ/FRAME` per line (the official order)
  <root>/<train|evaluation>/<SEQ>/rgb/<FRAME>.png
  <root>/<train|evaluation>/<SEQ>/meta/<FRAME>.pkl
Training meta: handPose [48] (full axis-angle: MANO with flat_hand_mean=True, i.e. hands_mean
already included), handBeta [10], handTrans [3], handJoints3D [21,3], camMat [3,3].
Evaluation meta: handJoints3D [3] (the root joint only), handBoundingBox [4] (x0, y0, x1, y1
pixels), camMat. Pickles are read with the MANO loader's restricted unpickler (no code runs).

Conventions: HO-3D's 3D annotations and its MANO parameters live in an OpenGL camera frame
(y up, the camera looking down -z); our examples are in the OpenCV frame (y down, +z forward):
p_cv = diag(1, -1, -1) p_gl. HO-3D joint order is MANO's (wrist, index, middle, pinky, ring,
thumb joints, then the tips thumb, index, middle, ring, pinky); FreiHAND joint k is HO-3D joint
HO3D_TO_FREIHAND[k] (the dataset's own jointsMapManoToSimple). The hands are right hands.

Evaluation examples carry no 3D targets (`has_targets` False); `bbox` is the given
handBoundingBox (the crop for evaluation) and `root` the given root joint.

Submission (the online evaluation server): `write_submission(zip_path, joints, verts)` writes
pred.json = [joints [N][21][3] in HO-3D order, verts [N][778][3]], both flipped back to the
OpenGL frame, in metres, in evaluation.txt order, zipped.
"""

import json
import os
import pathlib
import zipfile

import numpy as np

from datasets.dexycb import reader as dexycb_reader
from datasets.freihand import reader as freihand_reader
from diffhand_jax import mano

# FreiHAND joint k = HO-3D (MANO order) joint HO3D_TO_FREIHAND[k].
HO3D_TO_FREIHAND = (0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20)
# HO-3D joint j = FreiHAND joint FREIHAND_TO_HO3D[j] (the inverse permutation).
FREIHAND_TO_HO3D = tuple(int(i) for i in np.argsort(HO3D_TO_FREIHAND))
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0]).astype(np.float32)  # its own inverse
SPLITS = {'train': 'train', 'training': 'train', 'evaluation': 'evaluation', 'test': 'evaluation'}
NUM_JOINTS = 21


def flip(points):
  """OpenGL <-> OpenCV camera frame (negates y and z). Args: points [..., 3]."""
  return (np.asarray(points, np.float32) * np.array([1, -1, -1], np.float32)).astype(np.float32)


def _split_dir(split):
  if split not in SPLITS:
    raise ValueError(f'unknown HO-3D split {split!r} (known: {sorted(SPLITS)})')
  return SPLITS[split]


def frame_list(root, split):
  """[(sequence, frame)] of `<root>/<train|evaluation>.txt`, in file order."""
  path = pathlib.Path(root) / f'{_split_dir(split)}.txt'
  if not path.is_file():
    raise FileNotFoundError(f'HO-3D split list missing: {path}')
  frames = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    line = line.strip()
    if not line:
      continue
    parts = line.split('/')
    if len(parts) != 2:
      raise ValueError(f'{path}:{number}: expected SEQ/FRAME, got {line!r}')
    frames.append((parts[0], parts[1]))
  return frames


def read_meta(path):
  """One meta/*.pkl as a dict (restricted unpickler: arrays and plain values only)."""

  return mano.read_restricted_pickle(path, what='HO-3D meta pickle')


def _array(meta, key, shape, path):
  if meta.get(key) is None:
    raise ValueError(f'{path}: {key} is missing')
  value = np.asarray(meta[key], np.float32)
  if value.shape != shape:
    raise ValueError(f'{path}: {key} has shape {value.shape}, expected {shape}')
  return value


def mano_vertices(mano_dir, hand_pose, hand_beta, hand_trans):
  """Vertices [778,3] in the OpenCV frame from HO-3D's MANO parameters (OpenGL frame)."""

  model = dexycb_reader.load_mano_side(os.fspath(mano_dir), 'right')
  verts, _ = mano.mano_forward(
      model,
      np.asarray(hand_pose, np.float32)[None],
      np.asarray(hand_beta, np.float32)[None],
      np.asarray(hand_trans, np.float32)[None],
      flat_hand_mean=True,
  )
  return flip(np.asarray(verts[0])), np.asarray(model.hands_mean, np.float32)


def examples(root, split, *, mano_dir, depth_dir=None, skip_unannotated=True):
  """Yields HO-3D v2 examples as numpy dicts, in the order of the split's list file.

  Keys: image uint8 [480,640,3]; K [3,3]; is_right True; id (line index in the list file);
  sequence, frame (str); image_path; has_targets. Training adds joints3d [21,3] (OpenCV,
  metres, FreiHAND order), joints2d [21,2] (projected), verts [778,3] (our MANO layer, right
  model, flat_hand_mean=True), pose [48] (hands_mean removed, features.py) and betas [10].
  Evaluation adds bbox [4] (handBoundingBox) and root [3] (OpenCV). With `depth_dir`: depth
  [H,W,1] metres from <depth_dir>/<train|evaluation>/<SEQ>/rgb/<FRAME>.png|.npy.

  Args:
    root: the HO3D_v2 directory.
    split: 'train' or 'evaluation'.
    mano_dir: folder with MANO_RIGHT.pkl (training split only).
    depth_dir: optional precomputed depth maps (formats as freihand.reader).
    skip_unannotated: skip training frames whose handPose is None (their id is consumed).
  """
  split_dir = _split_dir(split)
  root = pathlib.Path(root)
  for index, (sequence, frame) in enumerate(frame_list(root, split)):
    meta_path = root / split_dir / sequence / 'meta' / f'{frame}.pkl'
    meta = read_meta(meta_path)
    if split_dir == 'train' and meta.get('handPose') is None:
      if skip_unannotated:
        continue
      raise ValueError(f'{meta_path}: the hand is not annotated in this frame')
    image_relative = pathlib.Path(split_dir) / sequence / 'rgb' / f'{frame}.png'
    image = freihand_reader.read_image(root / image_relative, 'RGB')
    K = _array(meta, 'camMat', (3, 3), meta_path)
    example = {
        'image': image,
        'K': K,
        'is_right': True,
        'id': index,
        'sequence': sequence,
        'frame': frame,
        'image_path': os.fspath(root / image_relative),
        'has_targets': split_dir == 'train',
    }
    if split_dir == 'train':
      pose = _array(meta, 'handPose', (48,), meta_path)
      betas = _array(meta, 'handBeta', (10,), meta_path)
      joints_gl = _array(meta, 'handJoints3D', (NUM_JOINTS, 3), meta_path)
      joints3d = flip(joints_gl)[list(HO3D_TO_FREIHAND)]
      verts, hands_mean = mano_vertices(
          mano_dir, pose, betas, _array(meta, 'handTrans', (3,), meta_path)
      )
      example.update(
          joints3d=joints3d,
          joints2d=freihand_reader.project(K, joints3d).astype(np.float32),
          verts=verts,
          betas=betas,
          pose=np.concatenate([pose[:3], pose[3:] - hands_mean]).astype(np.float32),
      )
    else:
      example['bbox'] = _array(meta, 'handBoundingBox', (4,), meta_path)
      example['root'] = flip(_array(meta, 'handJoints3D', (3,), meta_path))
    if depth_dir is not None:
      example['depth'] = freihand_reader.read_depth(depth_dir, image_relative, image.shape)
    yield example


def submission_arrays(joints, verts):
  """Our predictions -> the server's convention: HO-3D joint order, OpenGL frame.

  Args:
    joints: [N, 21, 3] metres, OpenCV frame, FreiHAND order.
    verts: [N, 778, 3] metres, OpenCV frame.
  Returns:
    (joints [N,21,3] HO-3D order, OpenGL; verts [N,778,3] OpenGL), float32.
  """
  joints, verts = np.asarray(joints, np.float32), np.asarray(verts, np.float32)
  if (
      joints.ndim != 3
      or joints.shape[1:] != (NUM_JOINTS, 3)
      or verts.ndim != 3
      or verts.shape[0] != joints.shape[0]
      or verts.shape[2] != 3
  ):
    raise ValueError(
        f'expected joints [N,21,3] and verts [N,V,3], got {joints.shape}, ' f'{verts.shape}'
    )
  return flip(joints[:, list(FREIHAND_TO_HO3D)]), flip(verts)


def write_submission(path, joints, verts, *, expected_count=None):
  """Writes the zipped pred.json the HO-3D evaluation server expects.

  Args:
    path: the .zip to write (holds one file, pred.json).
    joints: [N, 21, 3] our predictions (OpenCV frame, FreiHAND order, metres), in
      evaluation.txt order.
    verts: [N, 778, 3].
    expected_count: if given (e.g. len(frame_list(root, 'evaluation'))), N must equal it.
  Returns:
    the path written.
  """
  joints_gl, verts_gl = submission_arrays(joints, verts)
  if expected_count is not None and len(joints_gl) != expected_count:
    raise ValueError(f'{len(joints_gl)} predictions, the evaluation split has {expected_count}')
  # The official pred.py refuses predictions in front of the camera in OpenGL terms (z > 0).
  if len(joints_gl) and np.all(joints_gl[..., 2] > 0):
    raise ValueError(
        'the joints are not in front of the camera after the OpenGL flip: pass '
        'OpenCV-frame predictions (z > 0)'
    )
  payload = json.dumps([joints_gl.tolist(), verts_gl.tolist()])
  path = pathlib.Path(path)
  with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
    archive.writestr('pred.json', payload)
  return path
