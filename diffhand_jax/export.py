"""An evaluation-only copy of a run: its parameters and config, a third of a checkpoint.

python -m diffhand_jax.export WORKDIR OUT_WORKDIR
"""

import sys
from typing import Optional

import orbax.checkpoint as ocp

from diffhand_jax.checkpointing import CONFIG, STATE, checkpoint_dir, make_manager, restore_params


def export_params(workdir: str, out_workdir: str, step: Optional[int] = None) -> int:
  """Writes a small evaluation-only copy of a run: the parameters and the config.

  `out_workdir/checkpoints/<step>` holds {'params'} (the EMA when the run kept one) and the
  run's config: what `restore_params` (so --mode=eval / predict) and `init_from` read, a
  third of a full checkpoint (no optimiser moments, no RNG state). Training cannot resume
  from it; fine-tune with --config.init_from=out_workdir instead.

  Returns:
    The exported step.
  """
  with make_manager(workdir, read_only=True) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {checkpoint_dir(workdir)} to export')
    config = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[
        CONFIG
    ]
  params = restore_params(workdir, step)
  with make_manager(out_workdir, keep=1) as out:
    out.save(
        step,
        args=ocp.args.Composite(
            **{STATE: ocp.args.StandardSave({'params': params}), CONFIG: ocp.args.JsonSave(config)}
        ),
        force=True,
    )
    out.wait_until_finished()
  return step


def main(argv) -> None:
  if len(argv) != 3:
    sys.exit('usage: python -m diffhand_jax.export WORKDIR OUT_WORKDIR')
  print(f'exported step {export_params(argv[1], argv[2])} to {argv[2]}')


if __name__ == '__main__':
  main(sys.argv)
