"""The paper's Table 4 on synthetic hands: {vanilla, cross-modality decoder} x {without, with
diffusion}, each cell trained with the same budget, data and seeds, scored on unseen hands.

A cell is configs/synthetic.py with `--config.decoder` and `--config.diffusion` set; seed s
trains on the synthetic set of seed s (data, initialisation and augmentation all follow
config.seed) and is scored on 256 hands of seed s + 1000. All cells share the seeds, so cells
compare paired (same data, same unseen hands). Runs go to <root>/<cell>_seed<s>; a finished
run is reused (train.py resumes and stops at once), and a run already scored in
<root>/results.json with the same steps and overrides keeps its row (add seeds to a grid without
re-scoring the old ones).

  .venv/bin/python benchmarks/ablation.py --steps=300 --seeds=0,1 --root=runs/grid
  .venv/bin/python benchmarks/ablation.py --steps=300 --seeds=0 \
      --extra=--config.model.encoder_size=tiny,--config.model.num_blocks=2

Prints a markdown table (mean ± half-range over seeds, mm, next to the paper's FreiHAND
numbers) and the paired differences to the vanilla-without-diffusion cell; writes
<root>/results.json after every run.
"""

import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
import runs

# cell -> (decoder, diffusion, the paper's FreiHAND PA-MPJPE / MPJPE / PA-MPVPE / MPVPE, mm)
CELLS = {
    'vanilla_direct': ('vanilla', False, (7.87, 15.49, 7.08, 14.98)),
    'vanilla_diffusion': ('vanilla', True, (6.99, 13.93, 6.74, 13.99)),
    'cross_direct': ('cross_modality', False, (7.09, 13.94, 6.59, 13.51)),
    'cross_diffusion': ('cross_modality', True, (6.48, 13.16, 6.29, 13.34)),
}
METRICS = ('pa_mpjpe', 'mpjpe', 'pa_mpvpe', 'mpvpe')

flags.DEFINE_list('cells', list(CELLS), f'Subset of {list(CELLS)}.')
flags.DEFINE_list('seeds', ['0', '1'], 'Training seeds (each cell trains once per seed).')
flags.DEFINE_integer('steps', 300, 'Training steps per run (the budget).')
flags.DEFINE_string('root', 'runs/grid', 'Where the runs go.')
flags.DEFINE_list('extra', [], 'Overrides added to every run.')
FLAGS = flags.FLAGS


def cell_overrides(cell: str, seed: int) -> list[str]:
  decoder, diffusion, _ = CELLS[cell]
  return [
      *runs.budget_overrides(FLAGS.steps),
      f'--config.decoder={decoder}',
      f'--config.diffusion={diffusion}',
      f'--config.seed={seed}',
      *FLAGS.extra,
  ]


def spread(values) -> str:
  """'mean ± half-range' of a list of numbers (just the number for one)."""
  values = np.asarray(values, np.float64)
  if values.size == 1:
    return f'{values[0]:.1f}'
  return f'{values.mean():.1f} ± {(values.max() - values.min()) / 2:.1f}'


def print_table(rows):
  seeds = sorted({r['seed'] for r in rows})
  print(
      f'\n{FLAGS.steps} steps per run, seeds {seeds}, extra overrides: '
      f'{FLAGS.extra or "none"}; unseen hands (seed + 1000); mm, mean ± half-range over seeds\n'
  )
  print('| cross-modality | diffusion | PA-MPJPE | MPJPE | PA-MPVPE | MPVPE | paper (FreiHAND) |')
  print('|---|---|---|---|---|---|---|')
  for cell, (decoder, diffusion, paper) in CELLS.items():
    cell_rows = [r for r in rows if r['cell'] == cell]
    if not cell_rows:
      continue
    values = ' | '.join(spread([r[m] for r in cell_rows]) for m in METRICS)
    print(
        f"| {'✓' if decoder == 'cross_modality' else '✗'} | {'✓' if diffusion else '✗'} | "
        f"{values} | {' / '.join(f'{p:.2f}' for p in paper)} |"
    )
  print('\nPaired differences to vanilla without diffusion (same seed), MPJPE / PA-MPJPE, mm:')
  base = {r['seed']: r for r in rows if r['cell'] == 'vanilla_direct'}
  for cell in CELLS:
    pairs = [(r, base[r['seed']]) for r in rows if r['cell'] == cell and r['seed'] in base]
    if cell == 'vanilla_direct' or not pairs:
      continue
    d_mpjpe = [r['mpjpe'] - b['mpjpe'] for r, b in pairs]
    d_pa = [r['pa_mpjpe'] - b['pa_mpjpe'] for r, b in pairs]
    print(
        f"  {cell}: {', '.join(f'{d:+.1f}' for d in d_mpjpe)} / "
        f"{', '.join(f'{d:+.1f}' for d in d_pa)}"
    )


def main(argv):
  del argv
  os.makedirs(FLAGS.root, exist_ok=True)
  for cell in FLAGS.cells:
    if cell not in CELLS:
      raise app.UsageError(f'unknown cell {cell!r}; known: {list(CELLS)}')
  results_path = os.path.join(FLAGS.root, 'results.json')
  try:
    rows = runs.load_rows(
        results_path,
        name=lambda row: f"{row['cell']} seed {row['seed']}",
        expected_overrides=lambda row: cell_overrides(row['cell'], row['seed']),
    )
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  scored_now = False
  for seed in (int(s) for s in FLAGS.seeds):
    for cell in FLAGS.cells:
      overrides = cell_overrides(cell, seed)
      if any(r['cell'] == cell and r['seed'] == seed for r in rows):
        print(f'{cell} seed {seed}: scored before, kept from {results_path}')
        continue
      workdir = os.path.join(FLAGS.root, f'{cell}_seed{seed}')
      seconds = runs.train(workdir, overrides)
      scores = runs.score(workdir, overrides)
      rows.append(dict(cell=cell, seed=seed, overrides=overrides, train_seconds=seconds, **scores))
      runs.save_rows(results_path, rows)
      print_table(rows)  # after every new row: the last one printed is the final table
      scored_now = True
  if not scored_now:
    print_table(rows)


if __name__ == '__main__':
  app.run(main)
