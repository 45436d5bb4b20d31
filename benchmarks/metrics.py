"""Times `metrics.freihand_metrics` on a FreiHAND-sized evaluation set, before and after.

Usage: python benchmarks/metrics.py [--samples 3960] [--repeats 3]

"before" computes the F-scores' nearest-neighbour tests in the plain form, as the official
toolbox does: every point searched in one exact k-d tree per sample (scipy's cKDTree), one
thread; "after" is `metrics.freihand_metrics` as shipped (one dense float32 pass over the pairs
for both directions on the device, `diffhand_jax/nearest.py`, with a float64 recheck near the
thresholds, overlapped with the host's alignment). Everything else (alignment, errors, AUCs) is
the shipped code in both. Both run interleaved in this process on the same hands, and their
metrics are compared (the largest absolute difference over the 12 numbers is printed; the
target is <= 1e-6). The first "after" call, which includes compiling the pass, is reported apart.

Hands: 3,960 hands of the procedural MANO model with random poses and shapes (ground truth);
predictions at two qualities: "close" (the ground truth + 5 mm Gaussian noise per coordinate,
a FreiHAND-level model) and "far" (another random pose of the same hand and a 2 cm shift, a
model that has not learned much).
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
from scipy import spatial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from diffhand_jax import mano
from diffhand_jax import metrics
from diffhand_jax import nearest
from diffhand_jax import procedural_mano


def random_hands(model, rng, num):
  """([num, 21, 3], [num, 778, 3]) metres: MANO with random pose (0.4 rad std) and shape."""
  pose = 0.4 * rng.standard_normal((num, 48)).astype(np.float32)
  betas = rng.standard_normal((num, 10)).astype(np.float32)
  verts, joints = jax.jit(mano.mano_forward)(model, pose, betas)
  return np.asarray(joints, np.float64), np.asarray(verts, np.float64)


def closer_than_before(a, b, thresholds):
  """The plain form of `nearest.closer_than`: exact nearest distances of every point, both ways,
  one k-d tree per sample (the bound, twice the largest threshold, lets the tree prune)."""
  bound = max(thresholds) * 2.0

  def nearest_distances(x, y):  # [samples, points_x] distance to the nearest point of y
    return np.stack(
        [spatial.cKDTree(y[i]).query(x[i], distance_upper_bound=bound)[0] for i in range(len(x))]
    )

  a_to_b, b_to_a = nearest_distances(a, b), nearest_distances(b, a)
  return tuple(np.stack([d < t for t in thresholds]) for d in (a_to_b, b_to_a))


def timed_metrics(before, hands):
  """(seconds, metrics) of one `freihand_metrics` call, with the plain form if `before`."""
  shipped = nearest.start, nearest.finish
  if before:
    nearest.start, nearest.finish = closer_than_before, lambda answer: answer
  try:
    start = time.perf_counter()
    result = metrics.freihand_metrics(*hands)
    return time.perf_counter() - start, result
  finally:
    nearest.start, nearest.finish = shipped


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--samples', type=int, default=3960)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  model = procedural_mano.procedural_hand(0)
  gt_joints, gt_verts = random_hands(model, rng, args.samples)
  other_joints, other_verts = random_hands(model, rng, args.samples)
  noise = lambda x: x + 0.005 * rng.standard_normal(x.shape)
  shift = np.array([0.02, 0.0, 0.0])
  cases = {
      'close (+5 mm noise)': (noise(gt_joints), noise(gt_verts), gt_joints, gt_verts),
      'far (other pose, 2 cm shift)': (
          other_joints + shift,
          other_verts + shift,
          gt_joints,
          gt_verts,
      ),
  }
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  first_call, _ = timed_metrics(False, next(iter(cases.values())))
  print(
      f'freihand_metrics on {args.samples} hands, {cpus} usable CPUs, jax {jax.__version__} '
      f'({jax.default_backend()}); first call of the shipped form (compiles the pass): '
      f'{first_call:.2f} s; median of {args.repeats} (min-max), seconds'
  )
  print('| predictions | before | after | after / before | max abs difference | f5 / f15 |')
  print('|---|---|---|---|---|---|')
  for name, hands in cases.items():
    times = {'before': [], 'after': []}
    for _ in range(args.repeats):
      seconds, before = timed_metrics(True, hands)
      times['before'].append(seconds)
      seconds, after = timed_metrics(False, hands)
      times['after'].append(seconds)
    diff = max(abs(before[k] - after[k]) for k in metrics.METRIC_KEYS)
    cells = {k: f'{np.median(v):.2f} ({np.min(v):.2f}-{np.max(v):.2f})' for k, v in times.items()}
    ratio = np.median(times['after']) / np.median(times['before'])
    print(
        f"| {name} | {cells['before']} | {cells['after']} | {ratio:.2f} | {diff:.1e} | "
        f"{after['f5']:.3f} / {after['f15']:.3f} |"
    )


if __name__ == '__main__':
  main()
