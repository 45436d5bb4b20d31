"""Does the hypotheses' spread rank the errors? (issue 10, "Uncertainty").

For a trained model on the evaluation split of an unseen seed (config.seed + 1000, the demo's
held-out hands), K hypotheses per image (DDIM, S steps, mean aggregate), this measures

  - pooled:   Spearman(vertex_std, per-vertex error) over all hands x 778 vertices;
  - per hand: Spearman(mean over vertices of vertex_std, MPVPE of the hand);
  - within:   the mean over hands of Spearman(vertex_std, per-vertex error) inside one hand
              (whether it finds the worse vertices of a hand, not only the worse hands);

where vertex_std is `sampling.hypothesis_spread` (RMS distance of the K root-relative
hypotheses to their mean, what eval/uncertainty.npz holds) and the error is the distance of
the root-relative mean prediction to the truth (what metrics.json's MPVPE averages). Each
variant (sampler settings) is a separate run on the same hands; the first one's results are
drawn as a figure: error against predicted uncertainty (binned) and a few hands coloured by
their per-vertex uncertainty and error.

Usage (the shipped model; the workdir is only read):
  cp -r pretrained/synthetic_demo /tmp/shipped
  python benchmarks/uncertainty.py --workdir=/tmp/shipped --hands=256 --hypotheses=8 \
      --variants='eta=0;eta=1' --figure=docs/uncertainty.png
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
from diffhand_jax import procedural_mano
from diffhand_jax import sampling

VARIANT_KEYS = {'eta': float, 'noise_scale': float, 'steps': int, 'hypotheses': int}
TARGET = 0.3  # issue 10: both Spearman figures at least this


def ranks(values) -> np.ndarray:
  """Ranks 1..n of a 1-D array; tied values share the mean of their ranks."""
  values = np.asarray(values).ravel()
  order = np.argsort(values, kind='mergesort')
  sorted_values = values[order]
  # Runs of equal values: start index of each run, and the run each sorted element is in.
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  run = np.cumsum(np.r_[True, sorted_values[1:] != sorted_values[:-1]]) - 1
  ends = np.r_[starts[1:], len(values)]
  mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
  out = np.empty(len(values), np.float64)
  out[order] = mean_rank[run]
  return out


def spearman(a, b) -> float:
  """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks."""
  rank_a, rank_b = ranks(a), ranks(b)
  if rank_a.shape != rank_b.shape:
    raise ValueError(f'spearman needs equal sizes, got {rank_a.shape} and {rank_b.shape}')
  rank_a, rank_b = rank_a - rank_a.mean(), rank_b - rank_b.mean()
  return float(np.sum(rank_a * rank_b) / np.sqrt(np.sum(rank_a**2) * np.sum(rank_b**2)))


def uncertainty_scores(vertex_std, vertex_errors) -> dict:
  """The rank correlations of the module docstring and the scales they compare.

  Args:
    vertex_std: [N, V] predicted uncertainty, metres.
    vertex_errors: [N, V] error of the evaluated prediction, metres.

  Returns:
    dict: 'pooled', 'per_hand', 'within_hand' (Spearman), 'mean_std_mm', 'mpvpe_mm'.
  """
  vertex_std, vertex_errors = np.asarray(vertex_std), np.asarray(vertex_errors)
  return {
      'pooled': spearman(vertex_std, vertex_errors),
      'per_hand': spearman(vertex_std.mean(axis=1), vertex_errors.mean(axis=1)),
      'within_hand': float(np.mean([spearman(s, e) for s, e in zip(vertex_std, vertex_errors)])),
      'mean_std_mm': float(vertex_std.mean() * 1000),
      'mpvpe_mm': float(vertex_errors.mean() * 1000),
  }


def diagnostics(hypotheses, gt_verts) -> dict:
  """Why the per-hand ranking is what it is (hypotheses [N, K, V, 3], gt_verts [N, V, 3], m).

  Returns:
    'split_half': Spearman between the per-hand mean spread of the first and of the second
      half of the K hypotheses: how reproducible the per-hand uncertainty is at K / 2 (a
      noisy estimate cannot rank hands, whatever it measures);
    'per_hand_vs_sample': Spearman(per-hand mean spread, per-hand MPVPE averaged over the
      single hypotheses): does the spread rank the error of one sample rather than of the mean;
    'bias_share': sum |mean - truth|^2 / sum mean_k |h_k - truth|^2 over all vertices (the
      squared error of a single hypothesis is bias^2 + spread^2: the share the spread cannot
      see);
    'cross_half': Spearman(per-hand mean spread of one half, MPVPE of the mean of the OTHER
      half), averaged over both directions: the per-hand ranking without the shared sampling
      noise (an outlying hypothesis inflates both the spread and the error of its own mean);
    'image_independent_pooled': the pooled Spearman of a predictor that ignores the image (for
      every hand, each vertex's spread averaged over all hands): what vertex geometry alone
      (fingertips far from the wrist) gives.
  """
  hypotheses = np.asarray(hypotheses, np.float64)
  half = hypotheses.shape[1] // 2
  first = np.asarray(sampling.hypothesis_spread(hypotheses[:, :half])).mean(axis=1)
  second = np.asarray(sampling.hypothesis_spread(hypotheses[:, half : 2 * half])).mean(axis=1)
  spread = np.asarray(sampling.hypothesis_spread(hypotheses)).mean(axis=1)
  sample_errors = np.linalg.norm(hypotheses - gt_verts[:, None], axis=-1)  # [N, K, V]
  bias = np.sum((hypotheses.mean(axis=1) - gt_verts) ** 2, axis=-1)  # [N, V]
  halves = hypotheses[:, :half], hypotheses[:, half : 2 * half]
  half_errors = [np.linalg.norm(h.mean(axis=1) - gt_verts, axis=-1).mean(axis=1) for h in halves]
  vertex_std = np.asarray(sampling.hypothesis_spread(hypotheses))
  vertex_errors = np.linalg.norm(hypotheses.mean(axis=1) - gt_verts, axis=-1)
  return {
      'split_half': spearman(first, second),
      'per_hand_vs_sample': spearman(spread, sample_errors.mean(axis=(1, 2))),
      'bias_share': float(bias.sum() / np.sum(np.mean(sample_errors**2, axis=1))),
      'cross_half': (spearman(first, half_errors[1]) + spearman(second, half_errors[0])) / 2,
      'image_independent_pooled': spearman(
          np.broadcast_to(vertex_std.mean(axis=0), vertex_std.shape), vertex_errors
      ),
  }


def parse_variants(text: str) -> list[dict]:
  """'eta=0;eta=1,noise_scale=1.5' -> [{'eta': 0.0}, {'eta': 1.0, 'noise_scale': 1.5}]."""
  variants = []
  for item in text.split(';'):
    variant = {}
    for pair in filter(None, item.split(',')):
      key, _, value = pair.partition('=')
      if key not in VARIANT_KEYS:
        raise ValueError(f'unknown variant key {key!r} (known: {sorted(VARIANT_KEYS)})')
      variant[key] = VARIANT_KEYS[key](value)
    variants.append(variant)
  return variants


def run_variant(config, params, variant, num_hypotheses, num_sampling_steps):
  """Samples the unseen hands with one sampler setting; returns (row, arrays)."""
  model = models.build_model(config)
  steps = variant.get('steps', num_sampling_steps)
  num_hypotheses = variant.get('hypotheses', num_hypotheses)
  fn = functools.partial(
      sampling.sample,
      model,
      num_sampling_steps=steps,
      num_hypotheses=num_hypotheses,
      eta=variant.get('eta', 0.0),
      noise_scale=variant.get('noise_scale', 1.0),
  )
  sample_fn = jax.jit(
      lambda p, images, rng, depth, k: fn(p, images, rng, depth=depth, intrinsics=k)
  )
  start = time.perf_counter()
  scores, predictions = demo.evaluate_unseen(
      config, None, params=params, sample_fn=sample_fn, keep_hypotheses=True
  )
  seconds = time.perf_counter() - start
  errors = metrics.per_example_errors(
      predictions['joints'], predictions['verts'], predictions['gt_joints'], predictions['gt_verts']
  )
  row = dict(
      variant,
      steps=steps,
      hypotheses=num_hypotheses,
      hands=int(len(predictions['index'])),
      mpjpe=scores['mpjpe'],
      pa_mpjpe=scores['pa_mpjpe'],
      mpvpe=scores['mpvpe'],
      seconds=seconds,
      **uncertainty_scores(predictions['vertex_std'], errors['vertex_errors']),
      **diagnostics(predictions['hypotheses'], predictions['gt_verts']),
  )
  arrays = {
      'vertex_std': predictions['vertex_std'],
      'vertex_errors': errors['vertex_errors'],
      'verts': predictions['verts'],
      'index': predictions['index'],
      'hypotheses': predictions['hypotheses'],
      'gt_verts': predictions['gt_verts'],
  }
  return row, arrays


def binned(vertex_std, vertex_errors, num_bins=10):
  """Mean std and mean error in bins of equal counts of vertex_std (pooled; input units)."""
  std, err = np.ravel(vertex_std), np.ravel(vertex_errors)
  edges = np.quantile(std, np.linspace(0, 1, num_bins + 1))
  which = np.clip(np.searchsorted(edges, std, side='right') - 1, 0, num_bins - 1)
  return (
      np.array([std[which == b].mean() for b in range(num_bins)]),
      np.array([err[which == b].mean() for b in range(num_bins)]),
  )


def draw_figure(path, arrays, faces, row, num_hands=4):
  """Binned error vs uncertainty, per-hand scatter, and hands coloured by std and by error."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  std, err = arrays['vertex_std'] * 1000, arrays['vertex_errors'] * 1000
  figure = plt.figure(figsize=(13, 9.5))
  grid = figure.add_gridspec(3, num_hands)
  ax = figure.add_subplot(grid[0, : num_hands // 2])
  centres, mean_errors = binned(std, err)
  ax.plot(centres, mean_errors, 'o-', label='mean error in the bin')
  top = max(centres.max(), mean_errors.max()) * 1.05
  ax.plot([0, top], [0, top], 'k:', label='error = std')
  ax.set_xlabel('predicted uncertainty vertex_std (mm), 10 bins of equal count')
  ax.set_ylabel('per-vertex error of the mean (mm)')
  ax.set_title(f'all vertices: Spearman {row["pooled"]:.2f}')
  ax.legend()
  ax = figure.add_subplot(grid[0, num_hands // 2 :])
  ax.scatter(std.mean(axis=1), err.mean(axis=1), s=8)
  ax.set_xlabel('mean vertex_std of the hand (mm)')
  ax.set_ylabel('MPVPE of the hand (mm)')
  ax.set_title(f'{len(std)} hands: Spearman {row["per_hand"]:.2f}')
  # Hands from the most to the least certain, evenly spread over the ranking.
  order = np.argsort(std.mean(axis=1))
  picks = order[np.linspace(0, len(order) - 1, num_hands).round().astype(int)]
  for column, hand in enumerate(picks):
    # Seen face-on: the plane of the mesh's two largest principal axes.
    centred = arrays['verts'][hand] - arrays['verts'][hand].mean(axis=0)
    verts = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
    for line, (values, label) in enumerate(((std, 'std'), (err, 'error'))):
      ax = figure.add_subplot(grid[1 + line, column])
      ax.triplot(verts[:, 0], verts[:, 1], faces, color='0.85', lw=0.3)
      points = ax.scatter(verts[:, 0], verts[:, 1], c=values[hand], s=4, cmap='viridis')
      figure.colorbar(points, ax=ax, label=f'{label} (mm)', shrink=0.8)
      ax.set_aspect('equal')
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(f'hand {int(arrays["index"][hand])}: {label}, mean {values[hand].mean():.0f}')
  figure.suptitle(
      f'predicted uncertainty vs error, K = {row["hypotheses"]}, S = {row["steps"]}, '
      f'eta = {row.get("eta", 0.0)}; {len(std)} unseen hands (mean meshes seen along their '
      'smallest principal axis)'
  )
  figure.tight_layout()
  figure.savefig(path, dpi=80)
  plt.close(figure)


def markdown(rows) -> str:
  """The results as a markdown table."""
  columns = (
      ('eta', lambda r: f'{r.get("eta", 0.0):g}'),
      ('x_T std', lambda r: f'{r.get("noise_scale", 1.0):g}'),
      ('S', lambda r: str(r['steps'])),
      ('K', lambda r: str(r['hypotheses'])),
      ('pooled ρ', lambda r: f'{r["pooled"]:.3f}'),
      ('per-hand ρ', lambda r: f'{r["per_hand"]:.3f}'),
      ('within-hand ρ', lambda r: f'{r["within_hand"]:.3f}'),
      ('split-half ρ', lambda r: f'{r["split_half"]:.3f}'),
      ('per-hand ρ vs one sample', lambda r: f'{r["per_hand_vs_sample"]:.3f}'),
      ('cross-half per-hand ρ', lambda r: f'{r["cross_half"]:.3f}'),
      ('image-blind pooled ρ', lambda r: f'{r["image_independent_pooled"]:.3f}'),
      ('bias share', lambda r: f'{r["bias_share"]:.2f}'),
      ('mean std (mm)', lambda r: f'{r["mean_std_mm"]:.1f}'),
      ('MPVPE', lambda r: f'{r["mpvpe"]:.1f}'),
      ('MPJPE', lambda r: f'{r["mpjpe"]:.1f}'),
      ('PA-MPJPE', lambda r: f'{r["pa_mpjpe"]:.1f}'),
      ('hands', lambda r: str(r['hands'])),
      ('wall (s)', lambda r: f'{r["seconds"]:.0f}'),
  )
  lines = ['| ' + ' | '.join(name for name, _ in columns) + ' |', '|---' * len(columns) + '|']
  for r in rows:
    lines.append('| ' + ' | '.join(cell(r) for _, cell in columns) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='pretrained/synthetic_demo', help='trained run (read)')
  parser.add_argument('--config_variant', default=None, help='configs/synthetic.py variant')
  parser.add_argument('--hands', type=int, default=256, help='unseen hands (<= the split)')
  parser.add_argument('--hypotheses', type=int, default=8)
  parser.add_argument('--steps', type=int, default=10, help='DDIM steps (a variant may override)')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument(
      '--variants',
      default='eta=0',
      help="';'-separated, each 'key=value,...' of eta, " 'noise_scale (std of x_T), steps',
  )
  parser.add_argument('--figure', default='', help='PNG of the first variant (e.g. docs/...)')
  parser.add_argument('--json', default='', help='write the rows here')
  parser.add_argument('--save', default='', help='folder for <variant number>.npz (arrays)')
  args = parser.parse_args()

  # The model the checkpoint was trained as (e.g. 128 px with space_to_depth=2).
  config = trained_model.adopt_trained_model(
      synthetic.get_config(args.config_variant), args.workdir
  )
  config.eval.num_examples = args.hands
  config.eval.batch_size = args.batch_size
  params = checkpointing.restore_params(args.workdir)
  rows = []
  for number, variant in enumerate(parse_variants(args.variants)):
    row, arrays = run_variant(config, params, variant, args.hypotheses, args.steps)
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.save:
      os.makedirs(args.save, exist_ok=True)
      np.savez(os.path.join(args.save, f'{number}.npz'), **arrays)
    if number == 0 and args.figure:
      faces = np.asarray(procedural_mano.load_hand_model(config).faces)
      draw_figure(args.figure, arrays, faces, row)
      print(f'figure: {args.figure}', flush=True)
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(rows, f, indent=1)
  print(markdown(rows))
  met = [r['pooled'] >= TARGET and r['per_hand'] >= TARGET for r in rows]
  print(f'target (both >= {TARGET}) met by {sum(met)} of {len(rows)} variants', flush=True)


if __name__ == '__main__':
  main()
