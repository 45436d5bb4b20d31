"""Reads DexYCB from its official release layout into plain numpy examples (no TensorFlow).

Layout (the release as the official dex-ycb-toolkit reads it):
  <root>/calibration/intrinsics/<serial>_640x480.yml   color: {fx, fy, ppx, ppy}
  <root>/calibration/mano_<calib>/mano.yml             betas: [10 floats]
  <root>/<subject>/<sequence>/meta.yml                 num_frames, mano_sides: [right|left],
                                                       mano_calib: [<calib>], ycb_ids, ...
  <root>/<subject>/<sequence>/<serial>/color_%06d.jpg
  <root>/<subject>/<sequence>/<serial>/labels_%06d.npz joint_3d [1,21,3] m, joint_2d [1,21,2]
                                                       px, pose_m [1,51], seg [H,W], pose_y
Subjects are the ten `<date>-subject-NN` folders, serials the eight cameras (SUBJECTS, SERIALS);
each subject has 100 sequences, taken in sorted order.

Splits (setup 's0', the "seen subjects, views and objects" setup used by the hand-mesh
literature), exactly as the toolkit's `DexYCBDataset(setup, split)` builds them:
  train: all 10 subjects, all 8 cameras, sequences i with i % 5 != 4 (80 per subject);
  val:   subjects 0-1,   all cameras, sequences i % 5 == 4;
  test:  subjects 2-9,   all cameras, sequences i % 5 == 4.
Order (= `id`, the index the toolkit and its result files use): subject, sequence, camera,
frame. Frames whose hand is not annotated (joint_3d all -1) keep their index but are skipped
(`skip_unannotated`, default on, as HandOccNet and the later hand-mesh papers filter them).

Labels: joint_3d is already in FreiHAND/OpenPose order (wrist, thumb..pinky base to tip), in
metres in the colour camera's OpenCV frame. pose_m = 3 global axis-angle | 45 PCA coefficients
| 3 translation, for manopth's `ManoLayer(flat_hand_mean=False, ncomps=45, use_pca=True,
side=...)` built from MANO_RIGHT.pkl or MANO_LEFT.pkl as they are (the toolkit's
`MANOLayer`): full hand pose = coefficients @ hands_components (of that side's file), plus
hands_mean; vertices = MANO(pose, betas) + translation. `verts` are computed that way through
our MANO layer (`mano.mano_forward`), from the left model for left hands (no mirroring here:
`is_right` tells the input pipeline to mirror). `pose` is the axis-angle pose without
hands_mean (features.py).
"""

import functools
import logging
import os
import pathlib
import sys

import numpy as np
import yaml

from datasets.freihand import reader as freihand_reader
from diffhand_jax import mano

SUBJECTS = tuple(
    f'{date}-subject-{i:02d}'
    for i, date in enumerate(
        (
            '20200709',
            '20200813',
            '20200820',
            '20200903',
            '20200908',
            '20200918',
            '20200928',
            '20201002',
            '20201015',
            '20201022',
        ),
        start=1,
    )
)
SERIALS = (
    '836212060125',
    '839512060362',
    '840412060917',
    '841412060263',
    '932122060857',
    '932122060861',
    '932122061900',
    '932122062010',
)
SEQUENCES_PER_SUBJECT = 100
NUM_JOINTS = 21
NUM_VERTICES = 778
# setup -> split -> (subject indices, serial indices, sequence-index predicate).
SETUPS = {
    's0': {
        'train': (range(10), range(8), lambda i: i % 5 != 4),
        'val': ((0, 1), range(8), lambda i: i % 5 == 4),
        'test': (range(2, 10), range(8), lambda i: i % 5 == 4),
    },
}
SPLITS = ('train', 'val', 'test')
CorruptFileError = freihand_reader.CorruptFileError


def _read_yaml(path):
  if not path.is_file():
    raise FileNotFoundError(f'DexYCB file missing: {path}')
  with open(path) as f:
    return yaml.safe_load(f)


def intrinsics(root, serial):
  """K [3,3] float32 of a camera from calibration/intrinsics/<serial>_640x480.yml."""
  color = _read_yaml(pathlib.Path(root) / 'calibration' / 'intrinsics' / f'{serial}_640x480.yml')[
      'color'
  ]
  return np.array(
      [[color['fx'], 0, color['ppx']], [0, color['fy'], color['ppy']], [0, 0, 1]], np.float32
  )


def split_spec(setup, split):
  """(subject indices, serial indices, sequence predicate) of a setup's split."""
  if setup not in SETUPS:
    raise ValueError(f'unknown DexYCB setup {setup!r} (implemented: {sorted(SETUPS)})')
  if split not in SPLITS:
    raise ValueError(f'unknown DexYCB split {split!r} (known: {SPLITS})')
  return SETUPS[setup][split]


def serials_of(setup, split):
  return [SERIALS[c] for c in split_spec(setup, split)[1]]


def sequences(root, split, setup='s0'):
  """The split's sequences in official order: [(relative dir, meta dict, betas [10])]."""
  root = pathlib.Path(root)
  subject_ids, _, keep = split_spec(setup, split)
  out = []
  for s in subject_ids:
    subject_dir = root / SUBJECTS[s]
    if not subject_dir.is_dir():
      raise FileNotFoundError(f'DexYCB subject directory missing: {subject_dir}')
    names = sorted(p.name for p in subject_dir.iterdir() if p.is_dir())
    if len(names) != SEQUENCES_PER_SUBJECT:
      # The official toolkit asserts 100; smaller copies in the same layout (tests) are read
      # with the same index rule.
      logging.warning(
          '%s has %d sequences, the release has %d', subject_dir, len(names), SEQUENCES_PER_SUBJECT
      )
    for i, name in enumerate(names):
      if not keep(i):
        continue
      meta = _read_yaml(subject_dir / name / 'meta.yml')
      calib = _read_yaml(root / 'calibration' / f'mano_{meta["mano_calib"][0]}' / 'mano.yml')
      betas = np.asarray(calib['betas'], np.float32)
      if betas.shape != (10,):
        raise ValueError(f'mano_{meta["mano_calib"][0]}/mano.yml: betas of shape {betas.shape}')
      out.append((f'{SUBJECTS[s]}/{name}', meta, betas))
  return out


def num_frames(root, split, setup='s0'):
  """Frames in the split (annotated or not) counted from the meta.yml files: the id range."""
  cameras = len(serials_of(setup, split))
  return sum(int(meta['num_frames']) * cameras for _, meta, _ in sequences(root, split, setup))


def count_annotated(root, split, setup='s0'):
  """Frames with an annotated hand (what `examples` yields): the size that turns epochs into
  steps. Reads every label file's joint_3d (no images). `python -m datasets.dexycb.reader
  count ROOT [split]` prints it."""
  root = pathlib.Path(root)
  serials = serials_of(setup, split)
  count = 0
  for relative, meta, _ in sequences(root, split, setup):
    for serial in serials:
      for frame in range(int(meta['num_frames'])):
        with np.load(root / relative / serial / f'labels_{frame:06d}.npz') as label:
          count += not np.all(label['joint_3d'] == -1)
  return count


@functools.lru_cache(maxsize=4)
def load_mano_side(mano_dir, side):
  """The MANO model of one side (MANO_RIGHT.pkl / MANO_LEFT.pkl in mano_dir), cached."""

  path = pathlib.Path(mano_dir) / f'MANO_{side.upper()}.pkl'
  if not path.is_file():
    raise FileNotFoundError(f'{path} missing: DexYCB {side} hands need the MANO {side} model')
  return mano.load_mano(os.fspath(path))


def mano_vertices(mano_dir, side, pose_m, betas):
  """Vertices [778,3] (metres, camera frame) and the axis-angle pose [48] of a DexYCB label.

  Args:
    mano_dir: the folder with MANO_RIGHT.pkl / MANO_LEFT.pkl.
    side: 'right' or 'left' (meta.yml mano_sides).
    pose_m: [51] global axis-angle | 45 PCA coefficients | translation.
    betas: [10].
  """

  model = load_mano_side(os.fspath(mano_dir), side)
  pose_m = np.asarray(pose_m, np.float64).reshape(51)
  hand_pose = pose_m[3:48] @ np.asarray(model.hands_components, np.float64)
  pose = np.concatenate([pose_m[:3], hand_pose]).astype(np.float32)
  verts, _ = mano.mano_forward(
      model,
      pose[None],
      np.asarray(betas, np.float32)[None],
      pose_m[None, 48:51].astype(np.float32),
      flat_hand_mean=False,
  )
  return np.asarray(verts[0], np.float32), pose


def bounding_box(joints2d, image_shape, margin=1.5):
  """Square box [x0, y0, x1, y1] around the 2D joints, `margin` x their extent, in the image."""
  low, high = joints2d.min(0), joints2d.max(0)
  centre, side = (low + high) / 2, margin * float(np.max(high - low))
  box = np.concatenate([centre - side / 2, centre + side / 2])
  return np.clip(box, 0, [image_shape[1], image_shape[0]] * 2).astype(np.float32)


def examples(root, split, *, setup='s0', mano_dir, depth_dir=None, skip_unannotated=True):
  """Yields DexYCB examples as numpy dicts, in official split order.

  Keys (datasets/features.py where they apply): image uint8 [480,640,3]; mask uint8 [H,W,1]
  (255 = hand, from the label's seg == 255); K [3,3]; joints3d [21,3] metres, camera frame,
  FreiHAND order; joints2d [21,2] pixels (the label's); verts [778,3]; pose [48]; betas [10];
  is_right; id (index in the official split order); bbox [4] (square box x0,y0,x1,y1 at 1.5x
  the 2D joints' extent); image_path; has_targets True; depth [H,W,1] metres when `depth_dir`
  is given (mirrors the root: <depth_dir>/<subject>/<sequence>/<serial>/color_%06d.png|.npy).

  Args:
    root: the DexYCB root (calibration/ and the subject folders).
    split: 'train', 'val' or 'test'.
    setup: 's0' (the only setup implemented).
    mano_dir: folder with MANO_RIGHT.pkl and MANO_LEFT.pkl.
    depth_dir: optional precomputed depth maps (see freihand.reader for the formats).
    skip_unannotated: skip frames whose joint_3d is all -1 (their id is still consumed).
  """
  root = pathlib.Path(root)
  serials = serials_of(setup, split)
  cameras = {serial: intrinsics(root, serial) for serial in serials}
  index = -1
  for relative, meta, betas in sequences(root, split, setup):
    side = meta['mano_sides'][0]
    if side not in ('right', 'left'):
      raise ValueError(f'{relative}/meta.yml: mano_sides[0] = {side!r}')
    for serial in serials:
      for frame in range(int(meta['num_frames'])):
        index += 1
        folder = pathlib.PurePosixPath(relative) / serial
        label_path = root / folder / f'labels_{frame:06d}.npz'
        if not label_path.is_file():
          raise FileNotFoundError(f'DexYCB label missing: {label_path}')
        with np.load(label_path, allow_pickle=False) as label:
          joints3d = np.asarray(label['joint_3d'], np.float32).reshape(NUM_JOINTS, 3)
          joints2d = np.asarray(label['joint_2d'], np.float32).reshape(NUM_JOINTS, 2)
          pose_m = np.asarray(label['pose_m'], np.float32).reshape(51)
          seg = np.asarray(label['seg']) if 'seg' in label.files else None
        if np.all(joints3d == -1):
          if skip_unannotated:
            continue
          raise ValueError(f'{label_path}: the hand is not annotated in this frame')
        image_relative = pathlib.Path(folder) / f'color_{frame:06d}.jpg'
        image = freihand_reader.read_image(root / image_relative, 'RGB')
        verts, pose = mano_vertices(mano_dir, side, pose_m, betas)
        example = {
            'image': image,
            'K': cameras[serial],
            'joints3d': joints3d,
            'joints2d': joints2d,
            'verts': verts,
            'pose': pose,
            'betas': betas,
            'is_right': side == 'right',
            'id': index,
            'bbox': bounding_box(joints2d, image.shape),
            'image_path': os.fspath(root / image_relative),
            'has_targets': True,
        }
        if seg is not None:
          example['mask'] = np.where(seg == 255, 255, 0).astype(np.uint8)[..., None]
        if depth_dir is not None:
          example['depth'] = freihand_reader.read_depth(depth_dir, image_relative, image.shape)
        yield example


if __name__ == '__main__':
  if len(sys.argv) not in (3, 4) or sys.argv[1] != 'count':
    raise SystemExit('usage: python -m datasets.dexycb.reader count DEXYCB_ROOT [train|val|test]')
  split_name = sys.argv[3] if len(sys.argv) == 4 else 'train'
  print(
      f's0 {split_name}: {count_annotated(sys.argv[2], split_name)} annotated frames of '
      f'{num_frames(sys.argv[2], split_name)}'
  )
