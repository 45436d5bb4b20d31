"""CPU renderer speed: ms per frame for the 1538-face hand at 128 and 224 px (not a test).

  .venv/bin/python benchmarks/render.py [--frames 40] [--sizes 128 224] [--pool_examples 1024]

Each frame is a different synthetic hand pose and camera (the data generator's own sampler,
scaled to the frame size), rendered by `render.render` (rasterise + smooth Lambert shading
over a background). Also reported: the rasteriser alone and a whole synthetic example
(sampling, MANO forward, background, render, occluder). Timings are medians over frames;
on a shared machine expect noise: the process CPU time printed beside the render time is
less sensitive to other jobs.

With --pool_examples N > 0: a split of N examples at the first size, encoded as the TFDS builder
stores them (`render_pool.render_split`), in one process against a pool of every core, in
alternating rounds (pool start-up included, as the builder pays it).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from datasets.synthetic import generate  # pylint: disable=g-import-not-at-top
from datasets.synthetic import render_pool  # pylint: disable=g-import-not-at-top
from diffhand_jax import mano  # pylint: disable=g-import-not-at-top
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
  parser.add_argument('--pool_examples', type=int, default=0)
  parser.add_argument('--rounds', type=int, default=2)
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

  if args.pool_examples > 0:
    _time_pool(hand_model, args.sizes[0], args.pool_examples, args.rounds)


def _time_pool(hand_model, size, count, rounds):
  """Prints examples/s of one split rendered by one process and by a pool, alternating."""
  spec = render_pool.SplitSpec(
      seed=1,
      stream=generate.TRAIN_STREAM,
      image_size=size,
      tip_ids=tuple(mano.TIP_VERTEX_IDS),
      orientation='held',
      with_depth=False,
  )
  workers = render_pool.default_workers()
  rates = {1: [], workers: []}
  for _ in range(rounds):
    for num_workers in rates:
      start = time.perf_counter()
      for _ in render_pool.render_split(hand_model, spec, count, num_workers, min_parallel=0):
        pass
      rates[num_workers].append(count / (time.perf_counter() - start))
  one, pool = np.median(rates[1]), np.median(rates[workers])
  print(
      f'{count} examples at {size}x{size}, PNG-encoded: one process {one:.1f} examples/s, '
      f'{workers} workers {pool:.1f} examples/s (ratio {pool / one:.2f}; per round: '
      + ', '.join(f'{p / o:.2f}' for o, p in zip(rates[1], rates[workers]))
      + ')'
  )


if __name__ == '__main__':
  main()
