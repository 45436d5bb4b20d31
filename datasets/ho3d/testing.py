"""Writes a tiny directory in the official HO-3D v2 layout (tests and examples)."""

import pathlib
import pickle

import numpy as np
from PIL import Image


def write_layout(
    root,
    *,
    sequences=('ABF10', 'MC1'),
    frames_per_sequence=2,
    num_eval=3,
    image_size=(24, 32),
    seed=0,
    unannotated=('MC1', '0001'),
):
  """Writes train.txt / evaluation.txt, rgb PNGs and meta pickles; returns the metas written.

  Training handJoints3D are arbitrary points in front of the camera in the OpenGL frame
  (z < 0), not the MANO joints of the pose: the reader passes them through (flip + reorder).
  `unannotated` (SEQ, FRAME) is written with handPose None (skipped by the reader).
  """
  rng = np.random.default_rng(seed)
  root = pathlib.Path(root)
  height, width = image_size
  metas = {'train': {}, 'evaluation': {}}

  def cam():
    return np.array([[615.0, 0, width / 2], [0, 615.0, height / 2], [0, 0, 1]], np.float32)

  def write(split, sequence, frame, meta, colour):
    for sub in ('rgb', 'meta'):
      (root / split / sequence / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.broadcast_to(np.uint8(colour), (height, width, 3)).copy()).save(
        root / split / sequence / 'rgb' / f'{frame}.png'
    )
    with open(root / split / sequence / 'meta' / f'{frame}.pkl', 'wb') as f:
      pickle.dump(meta, f, protocol=2)
    metas[split][f'{sequence}/{frame}'] = meta

  lines = []
  for s, sequence in enumerate(sequences):
    for f in range(frames_per_sequence):
      frame = f'{f:04d}'
      meta = {
          'handPose': rng.normal(0, 0.3, 48).astype(np.float32),
          'handBeta': rng.normal(0, 1, 10).astype(np.float32),
          'handTrans': np.array([0.02, -0.01, -0.5], np.float32),
          'handJoints3D': (np.array([0, 0, -0.5]) + rng.normal(0, 0.03, (21, 3))).astype(
              np.float32
          ),
          'camMat': cam(),
          'objName': '006_mustard_bottle',
          'objRot': np.zeros((3, 1), np.float32),
      }
      if (sequence, frame) == tuple(unannotated):
        meta.update(handPose=None, handBeta=None, handTrans=None, handJoints3D=None)
      write('train', sequence, frame, meta, (20 * s + 5 * f, 60, 90))
      lines.append(f'{sequence}/{frame}')
  (root / 'train.txt').write_text('\n'.join(lines) + '\n')
  lines = []
  for i in range(num_eval):
    frame = f'{i:04d}'
    meta = {
        'handJoints3D': np.array([0.01 * i, 0.02, -0.45], np.float32),
        'handBoundingBox': np.array([4 + i, 3, 20 + i, 18], np.float32),
        'camMat': cam(),
        'objName': '006_mustard_bottle',
    }
    write('evaluation', 'SM1', frame, meta, (200, 10 * i, 30))
    lines.append(f'SM1/{frame}')
  (root / 'evaluation.txt').write_text('\n'.join(lines) + '\n')
  return metas
