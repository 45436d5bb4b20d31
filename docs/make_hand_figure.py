"""Renders docs/synthetic_hand.png: the procedural hand at rest, hands_mean, a fist, a random pose.

Usage: python docs/make_hand_figure.py [--out docs/synthetic_hand.png] [--seed 0]
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from mpl_toolkits.mplot3d.art3d import Poly3DCollection  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffhand_jax import mano  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffhand_jax import mesh  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffhand_jax import procedural_mano  # pylint: disable=g-import-not-at-top,wrong-import-position


def fist_pose():
  """[48] full pose (flat_hand_mean=True): every joint curled about its flexion axis."""
  curl = np.array([0.0, 1.3, 1.6, 1.0, 1.3, 1.6, 1.0, 1.3, 1.6, 1.0, 1.3, 1.6, 1.0, 0.5, 0.6, 0.8])
  return (curl[:, None] * procedural_mano.flexion_axes()).reshape(-1)


# Rotations (rows: screen right, screen up, towards the viewer); no mirroring, so a right
# hand stays a right hand. Fingers (+x) point up the page in both.
PALM_VIEW = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # thumb right
SIDE_VIEW = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # from the pinky


def draw(ax, vertices, faces, title, rotation, light=(0.3, 0.5, 0.8)):
  """Lambert-shaded triangles of `vertices` [V, 3] seen through `rotation` [3, 3]."""
  view = vertices @ rotation.T
  normals = mesh.face_normals(view, faces)
  light = np.asarray(light) / np.linalg.norm(light)
  shade = 0.25 + 0.75 * np.clip(normals @ light, 0.0, 1.0)
  colors = np.clip(shade[:, None] * np.array([0.93, 0.72, 0.60]), 0.0, 1.0)
  ax.add_collection3d(Poly3DCollection(view[faces], facecolors=colors, edgecolors='none'))
  center = 0.5 * (view.min(0) + view.max(0))
  half = 0.5 * (view.max(0) - view.min(0)).max()
  ax.set_xlim(center[0] - half, center[0] + half)
  ax.set_ylim(center[1] - half, center[1] + half)
  ax.set_zlim(center[2] - half, center[2] + half)
  ax.view_init(elev=90, azim=-90)
  ax.set_box_aspect((1, 1, 1))
  ax.set_axis_off()
  ax.set_title(title)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument(
      '--out', default=os.path.join(os.path.dirname(__file__), 'synthetic_hand.png')
  )
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  model = procedural_mano.procedural_hand(args.seed)
  rng = np.random.default_rng(1)
  hands_mean = np.concatenate([np.zeros(3), model.hands_mean])
  random_pose = hands_mean + np.concatenate([np.zeros(3), 0.35 * rng.standard_normal(45)])
  poses = {
      'rest (zero pose)': np.zeros(48),
      'hands_mean': hands_mean,
      'fist': fist_pose(),
      'random pose': random_pose,
  }
  full = np.stack(list(poses.values())).astype(np.float32)
  vertices, _ = mano.mano_forward(
      model, full, np.zeros((len(full), 10), np.float32), flat_hand_mean=True
  )
  fig = plt.figure(figsize=(3.2 * len(poses), 6.4))
  for row, (rotation, view_name) in enumerate(((PALM_VIEW, 'palm'), (SIDE_VIEW, 'side'))):
    for k, title in enumerate(poses):
      ax = fig.add_subplot(2, len(poses), row * len(poses) + k + 1, projection='3d')
      draw(ax, np.asarray(vertices[k]), model.faces, f'{title}, {view_name}', rotation)
  fig.tight_layout()
  fig.savefig(args.out, dpi=80)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
