"""Renders docs/synthetic_samples.png: a grid of synthetic training examples with their 2D joints.

Each tile is `datasets.synthetic.make_example` at 224 px (seed 0, indices 0..rows*cols-1)
with the ground-truth skeleton drawn over it (FreiHAND bones, one colour per finger, wrist
white) and a corner tag: R / L for right / left hands.

Usage: python docs/make_samples_figure.py [--out docs/synthetic_samples.png] [--seed 0]
         [--rows 4] [--cols 4] [--size 224]
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image
from PIL import ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from datasets.synthetic import generate  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffhand_jax import procedural_mano  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffhand_jax import render  # pylint: disable=g-import-not-at-top,wrong-import-position

_GAP = 4


def tile(example):
  """One annotated example: image + skeleton + side tag, uint8 [S, S, 3]."""
  image = render.draw_skeleton(
      example['image'], example['joints2d'], thickness=1.5, joint_radius=2.0
  )
  picture = Image.fromarray(image)
  draw = ImageDraw.Draw(picture)
  draw.rectangle([2, 2, 16, 16], fill=(0, 0, 0))
  draw.text((6, 3), 'R' if example['is_right'] else 'L', fill=(255, 255, 255))
  return np.asarray(picture)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      '--out', default=os.path.join(os.path.dirname(__file__), 'synthetic_samples.png')
  )
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--rows', type=int, default=4)
  parser.add_argument('--cols', type=int, default=4)
  parser.add_argument('--size', type=int, default=224)
  args = parser.parse_args(argv)

  hand_model = procedural_mano.procedural_hand(0)
  size, step = args.size, args.size + _GAP
  canvas = np.full((args.rows * step - _GAP, args.cols * step - _GAP, 3), 255, np.uint8)
  examples = generate.examples(hand_model, args.seed, 0, args.rows * args.cols, size)
  for position, example in enumerate(examples):
    row, col = divmod(position, args.cols)
    canvas[row * step : row * step + size, col * step : col * step + size] = tile(example)
  Image.fromarray(canvas).save(args.out)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
