"""Warm-start compile time of the train step: JAX's compilation cache alone vs + the step cache.

Each measurement is a fresh process (in-memory caches would hide the cost), timing for the
synthetic default train step (benchmarks/train_step.build_step):
  - prepare: trace + lower (with the step cache: load the exported step, or trace + export),
  - compile: XLA compile, or loading the executable from the compilation cache,
  - first step: the first call after compiling.
Per variant a cold process (empty cache folders) comes first, then --rounds warm processes;
the variants' warm processes alternate round by round, so a shared machine's load falls
on both alike. Targets (issue 11, this CPU): cold <= 30 s, warm <= 5 s.

Usage:
  .venv/bin/python benchmarks/compile_time.py --rounds=3
  .venv/bin/python benchmarks/compile_time.py --config=smoke --rounds=2   # quick
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ('compilation cache', 'compilation + step cache')


def child(config_name: str, cache_dir: str, use_step_cache: bool):
  """Builds the step, times prepare / compile / first step; prints one JSON line."""
  # pylint: disable=g-import-not-at-top
  import jax

  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import train_step as bench

  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)  # as launch.py
  config = bench.make_config(config_name, 'float32', False)
  step_dir = os.path.join(cache_dir, 'exported') if use_step_cache else ''
  step, state, batch = bench.build_step(config, step_cache_dir=step_dir)
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  prepared = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  state, metrics = compiled(state, batch)
  loss = float(metrics['loss'])
  done = time.perf_counter()
  print(
      'RESULT '
      + json.dumps(
          dict(
              prepare_s=prepared - start,
              compile_s=compiled_at - prepared,
              first_step_s=done - compiled_at,
              loss=loss,
              loaded=getattr(step, 'loaded_from_cache', None),
          )
      ),
      flush=True,
  )


def run_child(config_name: str, cache_dir: str, use_step_cache: bool) -> dict:
  command = [
      sys.executable,
      os.path.abspath(__file__),
      '--child',
      '--config',
      config_name,
      '--cache_dir',
      cache_dir,
  ] + (['--step_cache'] if use_step_cache else [])
  result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
  for line in result.stdout.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT ') :])
  raise RuntimeError(f'benchmark process failed ({result.returncode}):\n{result.stderr[-3000:]}')


def summary(values) -> str:
  return f'{np.median(values):.2f} ({min(values):.2f}-{max(values):.2f})'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='synthetic', help='smoke | synthetic')
  parser.add_argument('--rounds', type=int, default=3, help='warm processes per variant')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--cache_dir', default='', help=argparse.SUPPRESS)
  parser.add_argument('--step_cache', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.config, args.cache_dir, args.step_cache)
    return

  root = tempfile.mkdtemp(prefix='compile_time_')
  try:
    folders = {v: os.path.join(root, str(i)) for i, v in enumerate(VARIANTS)}
    cold = {v: run_child(args.config, folders[v], v != VARIANTS[0]) for v in VARIANTS}
    warm = {v: [] for v in VARIANTS}
    for round_index in range(args.rounds):
      for v in VARIANTS:
        warm[v].append(run_child(args.config, folders[v], v != VARIANTS[0]))
      print(f'round {round_index + 1}/{args.rounds} done', flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)

  load = os.getloadavg()[0]
  print(
      f'\n{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {args.config} train step, '
      f'{platform.machine()} with {os.cpu_count()} CPUs, 1-min load average {load:.1f}; '
      f'seconds, warm = median (min-max) of {args.rounds} processes\n'
  )
  print(
      '| variant | cold: prepare + compile = total | warm prepare | warm compile '
      '| warm total | warm first step | first loss (cold / warm) |'
  )
  print('|---|---|---|---|---|---|---|')
  for v in VARIANTS:
    c, w = cold[v], warm[v]
    totals = [r['prepare_s'] + r['compile_s'] for r in w]
    losses = sorted({f"{r['loss']:.6f}" for r in w})
    print(
        f"| {v} | {c['prepare_s']:.2f} + {c['compile_s']:.2f} = "
        f"{c['prepare_s'] + c['compile_s']:.2f} | {summary([r['prepare_s'] for r in w])} | "
        f"{summary([r['compile_s'] for r in w])} | **{summary(totals)}** | "
        f"{summary([r['first_step_s'] for r in w])} | {c['loss']:.6f} / {', '.join(losses)} |"
    )
  ratio = np.median(
      [
          (b['prepare_s'] + b['compile_s']) / (a['prepare_s'] + a['compile_s'])
          for a, b in zip(warm[VARIANTS[0]], warm[VARIANTS[1]])
      ]
  )
  print(f'\nwarm total, step cache / compilation cache only: {ratio:.2f} (median of rounds)')
  if not all(r['loaded'] for r in warm[VARIANTS[1]]):
    print('WARNING: a warm process did not load the exported step')


if __name__ == '__main__':
  sys.path.insert(0, ROOT)
  from diffhand_jax import host_memory  # pylint: disable=g-import-not-at-top

  host_memory.reexec_with_huge_pages()
  main()
