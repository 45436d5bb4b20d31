"""Accuracy and time per image against DDIM steps S and hypotheses K (issue 10).

For a trained model on the evaluation split of an unseen seed (config.seed + 1000, the demo's
held-out hands), every (S, K) of the grid runs `sampling.sample` (eta = 0) through the
evaluation code (`demo.evaluate_unseen` -> `evaluate.predict_split`) and reports
  - MPJPE / PA-MPJPE / MPVPE (mm, root-relative, `metrics`) of the mean of the K hypotheses
    (the default aggregate);
  - for K > 1 the same for the medoid (`sampling.aggregate_hypotheses`) and for the oracle:
    per hand, the hypothesis with the lowest MPJPE against the truth (an upper bound that
    needs the answer; it shows how much a perfect selector could gain);
  - time per image: wall time of the sampler's LAST batch (compiled by then, so compile time
    is not in it) divided by the batch size, on this machine, K hypotheses included.

Usage (the shipped model; the workdir is only read):
  cp -r pretrained/synthetic_demo /tmp/shipped
  python benchmarks/steps_hypotheses.py --workdir=/tmp/shipped --hands=64 --batch_size=32
"""

import argparse
import functools
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import synthetic
from diffhand_jax import checkpointing
from diffhand_jax import trained_model
from diffhand_jax import demo
from diffhand_jax import metrics
from diffhand_jax import models
from diffhand_jax import sampling

KEYS = ('mpjpe', 'pa_mpjpe', 'mpvpe')


def timed(fn, times):
  """fn, with the wall time of each (finished) call appended to `times`."""

  def wrapper(*args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
    return out

  return wrapper


def aggregate_errors(hypotheses, gt_joints, gt_verts, regressor) -> dict:
  """Per-hand errors (mm) of the mean, the medoid and the oracle hypothesis.

  Args:
    hypotheses: [N, K, 778, 3] root-relative, metres.
    gt_joints: [N, 21, 3]; gt_verts: [N, 778, 3] root-relative, metres.
    regressor: [21, 778] joint regressor of the model.

  Returns:
    {'mean' | 'medoid' | 'oracle': `metrics.per_example_errors` output}.
  """
  hypotheses = np.asarray(hypotheses, np.float64)

  def errors(verts):
    joints = np.einsum('jn,bnd->bjd', regressor, verts)
    return metrics.per_example_errors(joints, verts, gt_joints, gt_verts)

  out = {
      name: errors(np.asarray(sampling.aggregate_hypotheses(hypotheses, name), np.float64))
      for name in sampling.AGGREGATES
  }
  each = [errors(hypotheses[:, k]) for k in range(hypotheses.shape[1])]
  best = np.argmin(np.stack([e['mpjpe'] for e in each], axis=1), axis=1)  # [N]
  hands = np.arange(len(best))
  out['oracle'] = {
      key: np.stack([e[key] for e in each], axis=1)[hands, best]
      for key in ('mpjpe', 'pa_mpjpe', 'mpvpe', 'pa_mpvpe')
  }
  return out


def run_cell(config, params, model, steps, hypotheses):
  """One (S, K): returns the row of the tables."""
  times = []
  fn = functools.partial(
      sampling.sample, model, num_sampling_steps=steps, num_hypotheses=hypotheses
  )
  sample_fn = timed(
      jax.jit(lambda p, images, rng, depth, k: fn(p, images, rng, depth=depth, intrinsics=k)),
      times,
  )
  start = time.perf_counter()
  _, predictions = demo.evaluate_unseen(
      config, None, params=params, sample_fn=sample_fn, keep_hypotheses=True
  )
  regressor = np.asarray(model.joint_regressor.array, np.float64)
  per_hand = aggregate_errors(
      predictions['hypotheses'], predictions['gt_joints'], predictions['gt_verts'], regressor
  )
  row = {
      'steps': steps,
      'hypotheses': hypotheses,
      'hands': int(len(predictions['index'])),
      'batch_size': int(config.eval.batch_size),
      'batches': len(times),
      'seconds_per_image': times[-1] / int(config.eval.batch_size),
      'first_batch_seconds': times[0],  # compile included
      'wall_seconds': time.perf_counter() - start,
  }
  for name, errors in per_hand.items():
    for key in KEYS:
      row[f'{name}_{key}'] = float(np.mean(errors[key]))
  return row


def markdown(rows) -> str:
  """Two tables: accuracy + time of the mean for every (S, K); mean / medoid / oracle."""
  lines = [
      '| S | K | MPJPE | PA-MPJPE | MPVPE | time per image (s) |',
      '|---|---|---|---|---|---|',
  ]
  for r in rows:
    lines.append(
        f'| {r["steps"]} | {r["hypotheses"]} | {r["mean_mpjpe"]:.1f} |'
        f' {r["mean_pa_mpjpe"]:.1f} | {r["mean_mpvpe"]:.1f} | {r["seconds_per_image"]:.3f} |'
    )
  lines += [
      '',
      '| S | K | mean of K | medoid | oracle (best of K) |',
      '|---|---|---|---|---|',
  ]
  for r in rows:
    if r['hypotheses'] > 1:
      cells = [
          ' / '.join(f'{r[f"{name}_{key}"]:.1f}' for key in KEYS)
          for name in ('mean', 'medoid', 'oracle')
      ]
      lines.append(f'| {r["steps"]} | {r["hypotheses"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='pretrained/synthetic_demo', help='trained run (read)')
  parser.add_argument('--config_variant', default=None, help='configs/synthetic.py variant')
  parser.add_argument('--hands', type=int, default=64, help='unseen hands (<= the split)')
  parser.add_argument('--batch_size', type=int, default=32, help='images per sampler call')
  parser.add_argument('--steps', default='1,2,5,10,20')
  parser.add_argument('--hypotheses', default='1,4,16')
  parser.add_argument('--json', default='', help='write the rows here (after every cell)')
  args = parser.parse_args()

  # The model the checkpoint was trained as (e.g. 128 px with space_to_depth=2).
  config = trained_model.adopt_trained_model(
      synthetic.get_config(args.config_variant), args.workdir
  )
  config.eval.num_examples = args.hands
  config.eval.batch_size = args.batch_size
  model = models.build_model(config)
  params = checkpointing.restore_params(args.workdir)
  rows = []
  for hypotheses in (int(k) for k in args.hypotheses.split(',')):
    for steps in (int(s) for s in args.steps.split(',')):
      rows.append(run_cell(config, params, model, steps, hypotheses))
      print(json.dumps(rows[-1]), flush=True)
      if args.json:
        with open(args.json, 'w') as f:
          json.dump(rows, f, indent=1)
  print(markdown(rows), flush=True)


if __name__ == '__main__':
  main()
