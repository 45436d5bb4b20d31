"""Writes a tiny directory in the official DexYCB layout (tests and examples).

Every subject gets `sequences_per_subject` sequences (a multiple of 5, so that the s0 rule
i % 5 == 4 picks test/val sequences), each with `num_frames` frames from all 8 cameras.
Sides alternate right / left by sequence; frame 0 of camera 1 in every third sequence is left
unannotated (joint_3d = joint_2d = -1), as in the release.
"""

import pathlib

import numpy as np
from PIL import Image
import yaml

from datasets.dexycb import reader


def write_layout(
    root, mano_dir, *, sequences_per_subject=5, num_frames=1, image_size=(24, 32), seed=0
):
  """Writes the layout; returns {relative label path: dict of the arrays written}.

  Args:
    root: the directory to fill.
    mano_dir: where MANO_RIGHT.pkl / MANO_LEFT.pkl are (written by the caller).
    image_size: (height, width) of the colour images.
  """
  del mano_dir  # the labels hold MANO parameters; vertices are computed by the reader
  rng = np.random.default_rng(seed)
  root = pathlib.Path(root)
  height, width = image_size
  for serial in reader.SERIALS:
    path = root / 'calibration' / 'intrinsics' / f'{serial}_640x480.yml'
    path.parent.mkdir(parents=True, exist_ok=True)
    fx, fy = rng.uniform(600, 620, 2)
    path.write_text(
        yaml.safe_dump(
            {
                'color': {
                    'fx': float(fx),
                    'fy': float(fy),
                    'ppx': float(width / 2 + rng.uniform(-2, 2)),
                    'ppy': float(height / 2 + rng.uniform(-2, 2)),
                }
            }
        )
    )
  written = {}
  for s, subject in enumerate(reader.SUBJECTS):
    calib = f'20200101-subject-{s + 1:02d}'
    calib_file = root / 'calibration' / f'mano_{calib}' / 'mano.yml'
    calib_file.parent.mkdir(parents=True, exist_ok=True)
    calib_file.write_text(yaml.safe_dump({'betas': rng.normal(0, 1, 10).tolist()}))
    for q in range(sequences_per_subject):
      sequence = root / subject / f'20200101_{100000 + q:06d}'
      sequence.mkdir(parents=True)
      side = 'right' if q % 2 == 0 else 'left'
      (sequence / 'meta.yml').write_text(
          yaml.safe_dump(
              {
                  'num_frames': num_frames,
                  'mano_sides': [side],
                  'mano_calib': [calib],
                  'ycb_ids': [1, 2],
                  'ycb_grasp_ind': 0,
              }
          )
      )
      for c, serial in enumerate(reader.SERIALS):
        (sequence / serial).mkdir()
        for f in range(num_frames):
          joints3d = np.array([0.0, 0.0, 0.6]) + rng.normal(0, 0.03, (21, 3))
          joints2d = joints3d[:, :2] / joints3d[:, 2:] * 600 + [width / 2, height / 2]
          if q % 3 == 0 and c == 1 and f == 0:
            joints3d, joints2d = -np.ones((21, 3)), -np.ones((21, 2))
          seg = np.zeros((height, width), np.uint8)
          seg[height // 4 : height // 2, width // 4 : width // 2] = 255
          seg[0, 0] = 3  # an object pixel
          label = {
              'joint_3d': joints3d[None].astype(np.float32),
              'joint_2d': joints2d[None].astype(np.float32),
              'pose_m': np.concatenate([rng.normal(0, 0.5, 48), [0.01, -0.02, 0.6]])[None].astype(
                  np.float32
              ),
              'pose_y': np.zeros((2, 3, 4), np.float32),
              'seg': seg,
          }
          np.savez(sequence / serial / f'labels_{f:06d}.npz', **label)
          colour = np.array([(40 * s + 7 * q) % 250, (30 * c) % 250, (50 * f) % 250], np.uint8)
          Image.fromarray(np.broadcast_to(colour, (height, width, 3)).copy()).save(
              sequence / serial / f'color_{f:06d}.jpg', quality=95
          )
          written[f'{subject}/{sequence.name}/{serial}/labels_{f:06d}.npz'] = dict(
              label, side=side, betas=yaml.safe_load(calib_file.read_text())['betas']
          )
  return written
