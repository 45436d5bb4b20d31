"""Training runs driven from a benchmark: train (or resume) a config variant, then score it.

A variant is configs/synthetic.py plus `--config.*` overrides. Training runs `launch.py` in a
subprocess (its log appended to <workdir>/train.log); scoring is `demo.evaluate_unseen` on
held-out hands of a seed the run never saw (config.seed + 1000).

ml_collections' config flags read overrides from sys.argv only, so `config_with` applies the
same overrides by hand for the scoring side: values parse as Python literals, else stay strings.
"""

import ast
import json
import os
import subprocess
import sys
import time
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def budget_overrides(steps: int) -> list[str]:
  """The overrides that set a run's budget: steps, one eval/checkpoint at the end, warm-up."""
  return [
      f'--config.train.num_steps={steps}',
      f'--config.train.eval_every={steps}',
      f'--config.train.checkpoint_every={steps}',
      f'--config.optim.warmup_steps={max(1, steps // 10)}',
  ]


def train(workdir: str, overrides: Sequence[str]) -> float:
  """Trains (or resumes) configs/synthetic.py with `overrides` in `workdir`; returns seconds."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  command = [
      sys.executable,
      os.path.join(ROOT, 'launch.py'),
      '--config=' + os.path.join(ROOT, 'configs', 'synthetic.py'),
      f'--workdir={workdir}',
      *overrides,
  ]
  started = time.perf_counter()
  with open(os.path.join(workdir, 'train.log'), 'a') as log:
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
  return time.perf_counter() - started


def config_with(overrides: Sequence[str]):
  """configs/synthetic.py with `--config.a.b=value` overrides applied."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config()
  for override in overrides:
    if not override.startswith('--config.'):
      raise ValueError(f'not a config override: {override!r}')
    path, _, text = override[len('--config.') :].partition('=')
    *parents, key = path.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node[key] = value
  return config


def score(workdir: str, overrides: Sequence[str]) -> dict:
  """`demo.evaluate_unseen` scores of the run in `workdir` (trained with `overrides`)."""
  from diffhand_jax import demo  # pylint: disable=g-import-not-at-top

  scores, _ = demo.evaluate_unseen(config_with(overrides), workdir)
  return scores


def load_rows(path: str, name, expected_overrides) -> list[dict]:
  """Scored rows of an earlier run of a driver, kept at `path` ([] if none).

  A row made with other overrides (another budget) than this command would use for it would
  mix budgets in one table, so it is an error naming the row; rows written before `overrides`
  was recorded are taken as they are.

  Args:
    path: the driver's results.json.
    name: row -> its name in messages ("cross_direct seed 1").
    expected_overrides: row -> the overrides this command would run that row with.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = json.load(f)
  for row in rows:
    expected = expected_overrides(row)
    if 'overrides' in row and row['overrides'] != expected:
      raise ValueError(
          f"{path}: {name(row)} was run with {row['overrides']}, this command would use "
          f'{expected}; use another --root or the same flags'
      )
  return rows


def save_rows(path: str, rows: Sequence[dict]) -> None:
  """Writes the rows as results.json, through a temporary file (a kill keeps the old one)."""
  with open(path + '.tmp', 'w') as f:
    json.dump(list(rows), f, indent=2, default=float)
  os.replace(path + '.tmp', path)
