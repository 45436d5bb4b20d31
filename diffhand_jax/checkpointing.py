"""Orbax checkpoints of the train state: latest k + the best by an eval metric.

Layout: <workdir>/checkpoints/<step>/{state, config}. `state` is the whole
TrainState (params, optimizer state, EMA params, RNG key, step); the data
iterator position is the step itself, because the train stream is a function
of (seed, start_step). `config` is the run's config as JSON, for reading a
checkpoint without the command line that made it.
"""
import json
import math
import os
from typing import Any, Mapping, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

STATE = 'state'
CONFIG = 'config'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, *, keep: int = 3,
                 best_metric: Optional[str] = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep` steps and the best one.

  Args:
    workdir: the run's directory; checkpoints go to workdir/checkpoints.
    keep: how many of the most recent checkpoints to keep.
    best_metric: name of an eval metric (lower is better); the checkpoint
      saved with the lowest value is kept as well, whatever its age.
    read_only: for eval/predict: never creates, saves or deletes.
  Saves are asynchronous: `save` returns once the arrays are copied off the
  devices; call `wait_until_finished` before reading the files.
  """
  if keep < 1:
    raise ValueError(f'train.keep_checkpoints must be >= 1, got {keep}')
  policies = [checkpoint_managers.LatestN(n=keep)]
  if best_metric:
    policies.append(checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: _finite_or_inf(metrics[best_metric]),
        reverse=True,  # BestN keeps the tail of the sort: descending = lowest
        n=1, keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=True, create=not read_only,
      read_only=read_only, save_interval_steps=0 if read_only else 1)
  # Explicit handlers (not just item names): metadata can then be read
  # before a restore, which `restore_state(target=None)` needs.
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={STATE: ocp.StandardCheckpointHandler(),
                     CONFIG: ocp.JsonCheckpointHandler()})


def _finite_or_inf(value) -> float:
  value = float(value)
  return value if math.isfinite(value) else math.inf


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict,
         metrics: Optional[Mapping[str, float]] = None,
         force: bool = True) -> bool:
  """Starts an async save of `state` (host or device arrays) at `step`."""
  return manager.save(
      step,
      args=ocp.args.Composite(**{
          STATE: ocp.args.StandardSave(state),
          CONFIG: ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
      }),
      metrics=None if metrics is None else {k: float(v)
                                           for k, v in metrics.items()},
      force=force)


def restore_state(manager: ocp.CheckpointManager, step: int,
                  target: Any = None) -> Any:
  """Restores the state saved at `step`.

  Args:
    target: a pytree of arrays (or jax.ShapeDtypeStruct) with the structure,
      dtypes and shardings to restore into; None restores the raw nested
      dicts of numpy/jax arrays (e.g. to pick the params of another run).
  """
  if target is None:
    # Onto this process's first device, whatever topology saved it (e.g. a
    # run trained on 4 accelerators, evaluated on a laptop).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = manager.item_metadata(step)[STATE]
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                          sharding=device), metadata)
  restored = manager.restore(step, args=ocp.args.Composite(
      **{STATE: ocp.args.StandardRestore(target)}))
  return restored[STATE]


def latest_step(workdir: str) -> Optional[int]:
  """The newest saved step under workdir/checkpoints, None when there is none."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  with make_manager(workdir, read_only=True) as manager:
    return manager.latest_step()
