"""Orbax checkpoints of the train state: latest k + the best by an eval metric.

Layout: <workdir>/checkpoints/<step>/{state, config}. `state` is the whole
TrainState (params, optimizer state, EMA params, RNG key, step); the data
iterator position is the step itself, because the train stream is a function
of (seed, start_step). `config` is the run's config as JSON, for reading a
checkpoint without the command line that made it.

Evaluation, prediction and fine-tuning read parameters through `restore_params` and
`load_params_into`: this module is where they meet training.
"""

import contextlib
import json
import logging as py_logging
import math
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

STATE = 'state'
CONFIG = 'config'
# Orbax logs this warning for every read-only manager; eval and predict always open one.
_READ_ONLY_NOTICE = 'Given directory is read only'
# Checkpoints that cannot be read are moved here (by training only), out of orbax's way.
UNREADABLE_DIR = 'unreadable_checkpoints'
# Free space asked of the checkpoint folder at start, on top of what the checkpoints need.
MIN_FREE_BYTES = 64 << 20


class WorkdirError(OSError):
  """The workdir or its checkpoint folder cannot take checkpoints (unwritable, disk full)."""


class UnreadableCheckpointError(ValueError):
  """Checkpoints exist but none of them can be read."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def check_writable(workdir: str, needed_bytes: int = 0):
  """Fails fast, before any training time is spent, when checkpoints could not be written.

  Creates the workdir and its checkpoint folder, writes and removes a probe file in each,
  and asks for `needed_bytes` + MIN_FREE_BYTES of free space in the checkpoint folder.

  Raises:
    WorkdirError: naming the folder and what is wrong with it.
  """
  folders = (os.path.abspath(workdir), checkpoint_dir(workdir))
  for folder in folders:
    try:
      os.makedirs(folder, exist_ok=True)
      with tempfile.TemporaryFile(dir=folder, prefix='.write_probe_') as probe:
        probe.write(b'0')
        probe.flush()
        os.fsync(probe.fileno())
    except OSError as e:
      raise WorkdirError(
          f'cannot write to {folder} ({type(e).__name__}: {e.strerror or e}); '
          'checkpoints need a writable --workdir'
      ) from e
  free = shutil.disk_usage(folders[1]).free
  wanted = int(needed_bytes) + MIN_FREE_BYTES
  if free < wanted:
    raise WorkdirError(
        f'not enough free disk space in {folders[1]}: {free / 2**20:.1f} MiB free, '
        f'{wanted / 2**20:.1f} MiB needed (two checkpoints of {needed_bytes / 2**20:.1f} MiB '
        'each, and a margin)'
    )


def tree_nbytes(tree) -> int:
  """Bytes of the arrays in `tree` (a checkpoint of it takes about as much)."""
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def make_manager(
    workdir: str, *, keep: int = 3, best_metric: Optional[str] = None, read_only: bool = False
) -> ocp.CheckpointManager:
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
    policies.append(
        checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: _finite_or_inf(metrics[best_metric]),
            reverse=True,  # BestN keeps the tail of the sort: descending = lowest
            n=1,
            keep_checkpoints_without_metrics=False,
        )
    )
  options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=True,
      create=not read_only,
      read_only=read_only,
      save_interval_steps=0 if read_only else 1,
      # The step folder is made in `save` itself: made in the background, a failure leaves
      # orbax's writer threads waiting 20 minutes for it, and the process cannot exit.
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
  )
  # Explicit handlers (not just item names): metadata can then be read
  # before a restore, which `restore_state(target=None)` needs.
  with _without_read_only_notice():
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler()},
    )


@contextlib.contextmanager
def _without_read_only_notice():
  """Drops orbax's "Given directory is read only" warning: reading is all eval asked for."""

  def keep(record):
    return not record.getMessage().startswith(_READ_ONLY_NOTICE)

  absl_logger = py_logging.getLogger('absl')
  absl_logger.addFilter(keep)
  try:
    yield
  finally:
    absl_logger.removeFilter(keep)


def _finite_or_inf(value) -> float:
  value = float(value)
  return value if math.isfinite(value) else math.inf


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    config: ml_collections.ConfigDict,
    metrics: Optional[Mapping[str, float]] = None,
    force: bool = True,
) -> bool:
  """Starts an async save of `state` (host or device arrays) at `step`."""
  return manager.save(
      step,
      args=ocp.args.Composite(
          **{
              STATE: ocp.args.StandardSave(state),
              CONFIG: ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
          }
      ),
      metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
      force=force,
  )


def error_summary(error, limit=400) -> str:
  """The first line of an error's text, cut at `limit` characters."""
  text = str(error).strip().splitlines()
  text = text[0] if text else ''
  return text if len(text) <= limit else text[:limit] + '...'


def restore_state(manager: ocp.CheckpointManager, step: int, target: Any = None) -> Any:
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
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), metadata
    )
  restored = manager.restore(
      step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)})
  )
  return restored[STATE]


def restore_latest_good(
    manager: ocp.CheckpointManager, target: Any = None, *, move_unreadable: bool = False
):
  """The newest checkpoint that can be read, falling back past unreadable ones.

  A checkpoint that fails to restore (a truncated or corrupt file, missing metadata, a
  missing item) is skipped with a warning naming its folder and the error.

  Args:
    target: as for `restore_state`.
    move_unreadable: (training) move each unreadable step folder to
      <workdir>/unreadable_checkpoints/<step>, so that the step can be saved again; nothing is
      deleted. Eval and predict leave the folder as it is.
  Returns:
    (step, state), or (None, None) when there is no checkpoint at all.
  Raises:
    UnreadableCheckpointError: checkpoints exist and none is readable (names the folder).
  """
  directory = os.fspath(manager.directory)
  problems = []
  manager.reload()  # the steps on disk now
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      state = restore_state(manager, step, target)
    except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
      problem = f'{os.path.join(directory, str(step))}: {type(e).__name__}: {error_summary(e)}'
      logging.warning('Unreadable checkpoint %s; trying the previous one.', problem)
      problems.append(problem)
      if move_unreadable:
        _move_aside(manager, step)
      continue
    if problems:
      logging.warning(
          'Using the checkpoint of step %d in %s: %d newer checkpoint(s) could not be read (%s).',
          step,
          directory,
          len(problems),
          '; '.join(problems),
      )
    return step, state
  if problems:
    raise UnreadableCheckpointError(
        f'no readable checkpoint in {directory}: ' + '; '.join(problems)
    )
  return None, None


def _move_aside(manager, step):
  """Moves an unreadable step folder to <workdir>/unreadable_checkpoints (process 0)."""
  if jax.process_index() == 0:
    source = os.path.join(os.fspath(manager.directory), str(step))
    target_dir = os.path.join(os.path.dirname(os.fspath(manager.directory)), UNREADABLE_DIR)
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, str(step))
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(target_dir, f'{step}.{suffix}')
      suffix += 1
    os.replace(source, target)
    logging.warning('Moved the unreadable checkpoint %s to %s.', source, target)
  manager.reload()


def latest_step(workdir: str) -> Optional[int]:
  """The newest saved step under workdir/checkpoints, None when there is none."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  with make_manager(workdir, read_only=True) as manager:
    return manager.latest_step()


# ---- Parameters for eval / predict / fine-tuning ----
def restore_params(workdir: str, step: Optional[int] = None):
  """The parameters of the latest (or given) checkpoint in workdir, on the host.

  Returns:
    The EMA parameters when the run kept them, else the raw ones: nested dicts of numpy
    arrays (the model's `params` collection), whatever topology saved them. Callers place
    them on their devices (e.g. replicated over an evaluation mesh).

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
    UnreadableCheckpointError: none of its checkpoints can be read.
  """
  return restore_latest_params(workdir, step)[1]


def restore_latest_params(workdir: str, step: Optional[int] = None):
  """(step, params) of `restore_params`; without `step`, the newest readable checkpoint
  (unreadable newer ones are skipped with a warning, see `restore_latest_good`)."""
  with make_manager(workdir, read_only=True) as manager:
    if step is None:
      step, raw = restore_latest_good(manager)
    else:
      raw = restore_state(manager, step)
  if step is None:
    raise FileNotFoundError(
        f'no checkpoint under {checkpoint_dir(workdir)}: train first (--mode=train) or '
        'point --workdir at a trained run'
    )
  ema = raw.get('ema_params')
  return step, jax.device_get(ema if ema else raw['params'])


def restore_config(workdir: str, step: Optional[int] = None) -> Optional[dict]:
  """The config saved with the latest (or given) checkpoint, as a dict; None when there is no
  checkpoint or it holds no readable config."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  with make_manager(workdir, read_only=True) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    try:
      return manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[
          CONFIG
      ]
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('checkpoint %d in %s: its config could not be read (%s)', step, workdir, e)
      return None


def load_params_into(params, workdir: str, adapt=None):
  """`params` with every leaf that a checkpoint in `workdir` has replaced.

  Leaves the checkpoint lacks (e.g. the depth branch when fine-tuning a model
  trained without depth) keep their initial values; a leaf present in both
  with a different shape is an error unless `adapt(path, loaded, wanted_shape)`
  returns it in the wanted shape (e.g. `encoder.init_from_adapter`; None = cannot).
  """
  loaded = flax.traverse_util.flatten_dict(flax.core.unfreeze(restore_params(workdir)))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  missing = []
  for path, value in flat.items():
    if path not in loaded:
      missing.append('/'.join(path))
      continue
    if np.shape(loaded[path]) != np.shape(value) and adapt is not None:
      adapted = adapt(path, loaded[path], np.shape(value))
      if adapted is not None:
        logging.info(
            'init_from %s: %s carried from shape %s to %s',
            workdir,
            '/'.join(path),
            np.shape(loaded[path]),
            np.shape(value),
        )
        loaded[path] = adapted
    if np.shape(loaded[path]) != np.shape(value):
      raise ValueError(
          f'init_from {workdir}: parameter {"/".join(path)} has '
          f'shape {np.shape(loaded[path])}, the model wants '
          f'{np.shape(value)}'
      )
    flat[path] = jnp.asarray(loaded[path], dtype=value.dtype)
  if missing:
    logging.info(
        'init_from %s: %d parameters keep their init: %s',
        workdir,
        len(missing),
        ', '.join(missing[:10]),
    )
  return flax.traverse_util.unflatten_dict(flat)
