"""CPU renderer speed: ms per frame for the 1538-face hand at 128 and 224 px (not a test).

  .venv/bin/python benchmarks/render.py [--frames 40] [--sizes 128 224]

Each frame is a different synthetic hand pose and camera (the data generator's own sampler,
scaled to the frame size), rendered by `render.render` (rasterise + smooth Lambert shading
over a background). Also reported: the rasteriser alone and a whole synthetic example
(sampling, MANO forward, background, render, occluder). Timings are medians over frames;
on a shared machine expect noise.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from datasets.synthetic import generate  # pylint: disable=g-import-not-at-top
from diffhand_jax import mano  # pylint: disable=g-import-not-at-top
from diffhand_jax import render  # pylint: disable=g-import-not-at-top


def _median_ms(function, arguments):
  times = []
  for args in arguments:
    start = time.perf_counter()
    function(*args)
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--frames', type=int, default=40)
  parser.add_argument('--sizes', type=int, nargs='+', default=[128, 224])
  args = parser.parse_args(argv)

  hand_model = mano.synthetic_mano(0)
  generate.make_example(hand_model, 0, 0, 64)               # compile the MANO forward
  for size in args.sizes:
    frames = []
    for index in range(args.frames):
      geometry = generate.sample_geometry(hand_model, np.random.default_rng([1, index]), size)
      frames.append((geometry['verts'], geometry['faces'], geometry['K'], size, size))
    render.render(*frames[0])                                # warm-up
    full = _median_ms(render.render, frames)
    raster = _median_ms(render.rasterize, frames)
    example = _median_ms(generate.make_example,
                         [(hand_model, 1, index, size) for index in range(args.frames // 4)])
    pixels = np.mean([render.rasterize(*frame).face_index.__ge__(0).mean() for frame in frames])
    print(f'{size}x{size}: render {full:.1f} ms/frame (rasterize {raster:.1f} ms), '
          f'whole synthetic example {example:.1f} ms; hand covers {100 * pixels:.0f}% '
          f'of the frame (median of {args.frames} frames)')


if __name__ == '__main__':
  main()
