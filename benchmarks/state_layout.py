"""The train step with its state as a parameter tree vs as flat vectors (issue 11).

Done leaf by leaf, the clip, AdamW, its decay mask, the update and the norms are ~2,300 of
the synthetic train step's ~3,900 top-level fusions (276 parameter arrays; BENCHMARKS.md,
"What the module holds"). `config.train.flat_state` (flat_state.py) keeps the parameters,
AdamW's moments and the EMA as single vectors inside the compiled step. This script builds
the step both ways (`benchmarks/train_step.build_step`, as training does) and prints, side by
side: top-level fusions, XLA compile time, the time to load the serialised executable, the
step time (interleaved rounds), the first losses and the largest parameter difference.

  .venv/bin/python benchmarks/state_layout.py --config=synthetic --rounds=5
"""

import argparse
import os
import statistics
import sys
import time

import jax
from jax.experimental import serialize_executable
from jax.flatten_util import ravel_pytree
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

# pylint: disable=g-import-not-at-top,wrong-import-position
import train_step as bench

LAYOUTS = (('tree', False), ('flat', True))


def top_level_fusions(compiled) -> int:
  """Fusion instructions of the entry computation (what the CPU runtime makes thunks of)."""
  text = compiled.as_text()
  entry = text[text.index('\nENTRY') :]
  return sum(' fusion(' in line for line in entry.splitlines())


def build(config_name: str, flat: bool):
  """(compiled step, state, batch, row of compile figures) for one layout."""
  config = bench.make_config(config_name, 'float32', False)
  config.train.flat_state = flat
  step, state, batch = bench.build_step(config)
  lowered = step.lower(state, batch)
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  start = time.perf_counter()
  serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
  load_s = time.perf_counter() - start
  row = dict(
      fusions=top_level_fusions(compiled),
      compile_s=compile_s,
      load_s=load_s,
      mb=len(payload) / 2**20,
  )
  return compiled, state, batch, row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='synthetic', help='benchmarks/train_step.py config name')
  parser.add_argument('--rounds', type=int, default=5, help='interleaved timing rounds')
  parser.add_argument('--steps_per_round', type=int, default=3)
  args = parser.parse_args()

  built = {name: build(args.config, flat) for name, flat in LAYOUTS}
  steps, states = {}, {}
  for name, (compiled, state, _, _) in built.items():
    steps[name], states[name] = compiled, state
  losses = {name: [] for name in steps}
  times = {name: [] for name in steps}
  for round_index in range(1 + args.rounds):  # round 0: the first steps, untimed
    for name, step in steps.items():
      start = time.perf_counter()
      for _ in range(args.steps_per_round):
        states[name], metrics = step(states[name], built[name][2])
        if round_index == 0:
          losses[name].append(float(metrics['loss']))
      jax.block_until_ready(metrics['loss'])
      if round_index:
        times[name].append((time.perf_counter() - start) / args.steps_per_round * 1e3)
  tree_vector = ravel_pytree(jax.device_get(states['tree'].params))[0]
  worst = float(np.max(np.abs(np.asarray(tree_vector) - np.asarray(states['flat'].params))))
  ratios = [f / t for f, t in zip(times['flat'], times['tree'])]

  print(
      f'\n{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {args.config} train step, '
      f'jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs, '
      f'1-min load {os.getloadavg()[0]:.1f}\n'
  )
  print(
      '| state layout | top-level fusions | XLA compile s | executable load s | executable MB '
      '| step ms (median, min-max) |'
  )
  print('|---|---:|---:|---:|---:|---|')
  for name, _ in LAYOUTS:
    row, t = built[name][3], times[name]
    print(
        f'| {name} | {row["fusions"]} | {row["compile_s"]:.1f} | {row["load_s"]:.2f} '
        f'| {row["mb"]:.1f} | {statistics.median(t):.0f} ({min(t):.0f}-{max(t):.0f}) |'
    )
  tree_row, flat_row = built['tree'][3], built['flat'][3]
  print(
      f'\nflat / tree: compile {flat_row["compile_s"] / tree_row["compile_s"]:.2f}, load '
      f'{flat_row["load_s"] / tree_row["load_s"]:.2f}, step {statistics.median(ratios):.2f} '
      f'(median of {args.rounds} interleaved rounds)'
  )
  steps_run = (1 + args.rounds) * args.steps_per_round
  print(
      f'first losses: tree {np.round(losses["tree"], 6).tolist()}, flat '
      f'{np.round(losses["flat"], 6).tolist()}; largest parameter difference after '
      f'{steps_run} steps: {worst:.2e}'
  )


if __name__ == '__main__':
  main()
