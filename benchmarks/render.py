"""CPU renderer speed: ms per frame for the 1538-face hand at 128 and 224 px (not a test).

  .venv/bin/python benchmarks/render.py [--frames 40] [--sizes 128 224]

Each frame is a different synthetic hand pose and camera (the data generator's own sampler,
scaled to the frame size), rendered by `render.render` (rasterise + smooth Lambert shading
over a background). Also reported: the rasteriser alone and a whole synthetic example
(sampling, MANO forward, background, render, occluder). Timings are medians over frames;
on a shared machine expect noise: the process CPU time printed beside the render time is
less sensitive to other jobs.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from datasets.synthetic import generate  # pylint: disable=g-import-not-at-top
from diffhand_jax import procedural_mano  # pylint: disable=g-import-not-at-top
from diffhand_jax import render  # pylint: disable=g-import-not-at-top


def _median_ms(function, arguments):
  """Median wall-clock and process-CPU milliseconds of function(*args) over `arguments`."""
  wall, cpu = [], []
  for args in arguments:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    function(*args)
    wall.append(time.perf_counter() - start_wall)
    cpu.append(time.process_time() - start_cpu)
  return 1e3 * float(np.median(wall)), 1e3 * float(np.median(cpu))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--frames', type=int, default=40)
  parser.add_argument('--sizes', type=int, nargs='+', default=[128, 224])
  args = parser.parse_args(argv)

  hand_model = procedural_mano.procedural_hand(0)
  generate.make_example(hand_model, 0, 0, 64)  # compile the MANO forward
  for size in args.sizes:
    frames = []
    for index in range(args.frames):
      geometry = generate.sample_geometry(hand_model, np.random.default_rng([1, index]), size)
      frames.append((geometry['verts'], geometry['faces'], geometry['K'], size, size))
    render.render(*frames[0])  # warm-up
    full = _median_ms(render.render, frames)
    raster = _median_ms(render.rasterize, frames)
    example = _median_ms(
        generate.make_example, [(hand_model, 1, index, size) for index in range(args.frames // 4)]
    )
    pixels = np.mean([(render.rasterize(*frame).face_index >= 0).mean() for frame in frames])
    print(
        f'{size}x{size}: render {full[0]:.1f} ms/frame (CPU time {full[1]:.1f} ms; '
        f'rasterize {raster[0]:.1f} ms), whole synthetic example {example[0]:.1f} ms; '
        f'hand covers {100 * pixels:.0f}% of the frame (median of {args.frames} frames)'
    )


if __name__ == '__main__':
  main()
