"""Which parts of the demo recipe matter: MPJPE at a fixed budget with each one switched off.

Each variant trains configs/synthetic.py with the same budget, data and seed, then is scored
on held-out hands of a seed it never saw (demo.evaluate_unseen), next to the mean-hand
baseline of that split. Runs go to <root>/<variant>; a finished run is reused.

  .venv/bin/python benchmarks/demo_ablation.py --steps=300 --root=runs/ablation
  .venv/bin/python benchmarks/demo_ablation.py --variants=full,no_aux_head --steps=300

Prints a table (markdown) of every variant scored under <root> (results.json): a variant
already scored there with the same overrides keeps its row and is not run again, so variants
can be added to a root one command at a time.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
import runs
from configs import synthetic

# name -> (what is switched off, config overrides)
VARIANTS = {
    'full': ('nothing (the recipe)', []),
    'no_t_max': ('t = T-1 share of the batch (t uniform)', ['--config.train.t_max_fraction=0']),
    'no_aux_head': ('auxiliary joint head', ['--config.model.aux_head=False']),
    'old_loss_weights': (
        '3D losses in diffusion units (the old metre-scaled weights)',
        [
            '--config.loss.x0_weight=1.01',
            '--config.loss.joints_weight=0.01',
            '--config.loss.reprojection_weight=1.0',
        ],
    ),
    'vit_encoder': (
        'ResNet encoder (ViT-Tiny from scratch instead)',
        ['--config.model.encoder=vit', '--config.model.encoder_size=tiny'],
    ),
    'uniform_orientation': (
        'held-hand orientations (uniform rotations instead)',
        ['--config.data.orientation=uniform'],
    ),
    'crop_augmentation': (
        'training without augmentation (crop and colour jitter on instead)',
        [f'--config.data.{key}={value}' for key, value in synthetic.CROP_AUGMENTATION.items()],
    ),
}

flags.DEFINE_list('variants', list(VARIANTS), f'Subset of {list(VARIANTS)}.')
flags.DEFINE_integer('steps', 300, 'Training steps per variant (the budget).')
flags.DEFINE_string('root', 'runs/ablation', 'Where the runs go.')
flags.DEFINE_list(
    'extra', [], 'Overrides added to every variant (e.g. ' '--config.data.num_train=4096).'
)
FLAGS = flags.FLAGS


def variant_overrides(variant: str) -> list[str]:
  """The full overrides of one variant under this command's budget and extra flags."""
  return [*runs.budget_overrides(FLAGS.steps), *VARIANTS[variant][1], *FLAGS.extra]


def main(argv):
  del argv
  os.makedirs(FLAGS.root, exist_ok=True)
  for variant in FLAGS.variants:
    if variant not in VARIANTS:
      raise app.UsageError(f'unknown variant {variant!r}; known: {list(VARIANTS)}')
  results_path = os.path.join(FLAGS.root, 'results.json')
  try:
    rows = runs.load_rows(
        results_path,
        name=lambda row: row['variant'],
        # A variant no longer defined here is kept as it was run (rows from before overrides
        # were recorded have none, and load_rows takes those as they are).
        expected_overrides=lambda row: (
            variant_overrides(row['variant'])
            if row['variant'] in VARIANTS
            else row.get('overrides')
        ),
    )
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  for variant in FLAGS.variants:
    if any(r['variant'] == variant for r in rows):
      print(f'{variant}: scored before, kept from {results_path}')
      continue
    workdir = os.path.join(FLAGS.root, variant)
    overrides = variant_overrides(variant)
    seconds = runs.train(workdir, overrides)
    scores = runs.score(workdir, overrides)
    rows.append(
        dict(
            variant=variant,
            off=VARIANTS[variant][0],
            overrides=overrides,
            train_seconds=seconds,
            **{k: scores[k] for k in scores if 'mpjpe' in k or k == 'mpvpe'},
        )
    )
    runs.save_rows(results_path, rows)
  print(
      f'\n{FLAGS.steps} steps per variant, extra overrides: {FLAGS.extra or "none"}; '
      'unseen seed; MPJPE / PA-MPJPE in mm (ratio to the mean hand)\n'
  )
  print(
      '| switched off | MPJPE | PA-MPJPE | one-step x̂0 MPJPE | aux MPJPE | mean hand '
      '| train s |'
  )
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    base = r['mean_hand_mpjpe'], r['mean_hand_pa_mpjpe']
    aux = f"{r['aux_mpjpe']:.1f}" if 'aux_mpjpe' in r else '-'
    print(
        f"| {r['off']} | {r['mpjpe']:.1f} ({r['mpjpe'] / base[0]:.2f}) | "
        f"{r['pa_mpjpe']:.1f} ({r['pa_mpjpe'] / base[1]:.2f}) | {r['onestep_mpjpe']:.1f} | "
        f"{aux} | {base[0]:.1f} / {base[1]:.1f} | {r['train_seconds']:.0f} |"
    )


if __name__ == '__main__':
  app.run(main)
