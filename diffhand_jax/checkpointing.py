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
import sys
import tempfile
from typing import Any, List, Mapping, Optional, Sequence

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


class CheckpointSaveError(RuntimeError):
  """An asynchronous checkpoint save failed; the checkpoints written before are intact."""


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


class AsyncSaver:
  """Asynchronous saves whose failure surfaces at the next `check` rather than the next save.

  Orbax finishes a save in background threads and, on failure, logs it and moves on; the
  error would otherwise only surface at the next save (maybe hours later). `check` is cheap
  (a lock and a flag while a save is in flight); call it every step.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self._unchecked_step = None  # the last save not yet known to have succeeded

  def save(self, step, state, config, metrics=None):
    self.check()
    try:
      save(self.manager, step, state, config, metrics=metrics)
    except Exception as e:  # an unwritable folder fails here, in this thread
      raise self._error(step, e) from e
    self._unchecked_step = step

  def check(self):
    """Raises CheckpointSaveError when the last save has finished and failed."""
    if self._unchecked_step is None or self.manager.is_saving_in_progress():
      return
    step, self._unchecked_step = self._unchecked_step, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._error(step, e) from e

  def close(self):
    """Waits for the save in flight and closes the manager, even when that save failed."""
    step, self._unchecked_step = self._unchecked_step, None
    error = None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      error = self._error(step, e)
      error.__cause__ = e
    # The failure is raised once per thread: close() now winds down orbax's threads.
    self.manager.close()
    if error is not None:
      raise error

  def _error(self, step, cause):
    try:
      self.manager.reload()
      intact = self.manager.all_steps()
    except Exception:  # the folder itself may be gone
      intact = []
    intact = [s for s in intact if s != step]
    return CheckpointSaveError(
        f'saving the checkpoint of step {step} to {self.manager.directory} failed '
        f'({type(cause).__name__}: {_first_line(cause)}); training stopped. Checkpoints '
        f'written before are intact: latest step {max(intact) if intact else None}.'
    )


def _first_line(error, limit=400):
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
      problem = f'{os.path.join(directory, str(step))}: {type(e).__name__}: {_first_line(e)}'
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


# config.model keys that change how the model computes or is initialised, not its function:
# `adopt_trained_model` leaves them as the command line says.
COMPUTE_ONLY_MODEL_KEYS = ('dtype', 'remat', 'pretrained_path', 'cpu_kernels')
# Fields outside config.model that define the function a checkpoint was trained as: the
# variant (Table 4), the diffusion space and schedule, the hand model's joints and the input
# (crop size, synthetic render size, crop margin).
TRAINED_FUNCTION_FIELDS = (
    'decoder',
    'diffusion',
    'vertex_scale',
    'tip_vertex_ids',
    'mano_seed',
    'schedule.num_timesteps',
    'schedule.cosine_s',
    'data.image_size',
    'data.render_size',
    'data.crop_margin',
)


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


def trained_function_fields(config: ml_collections.ConfigDict) -> List[str]:
  """Dotted names of every config field that defines the trained function: each
  `config.model` key but the compute-only ones, and TRAINED_FUNCTION_FIELDS."""
  model = [f'model.{key}' for key in config.model if key not in COMPUTE_ONLY_MODEL_KEYS]
  return model + list(TRAINED_FUNCTION_FIELDS)


def _lookup(tree: dict, field: str):
  """(True, value) of a dotted field in a nested dict, or (False, None) when it is absent."""
  node = tree
  for part in field.split('.'):
    if not isinstance(node, dict) or part not in node:
      return False, None
    node = node[part]
  return True, node


def adopt_trained_model(
    config: ml_collections.ConfigDict, workdir: str, explicit: Sequence[str] = ()
) -> ml_collections.ConfigDict:
  """`config` with the model the checkpoint in `workdir` was trained as.

  Evaluation and prediction build the model from the command-line config; a checkpoint must be
  evaluated as the function it was trained as (a direct regressor as a regressor, at its
  vertex scale, crop size, ...). Every field of `trained_function_fields` whose saved value
  differs is taken from the checkpoint's config with a warning naming it, unless the user set
  that field on the command line (`explicit`): then the conflict stops the run with an error
  naming it. Fields the saved config lacks (older runs) stay as given.

  Args:
    config: the command line's config.
    workdir: the run (or exported model) to evaluate.
    explicit: dotted names of the fields set on the command line (`launch.py` passes its
      `--config.*` overrides).

  Returns:
    A copy of `config` (the same values when the checkpoint has no config).

  Raises:
    ValueError: a field set on the command line differs from the trained model's.
  """
  saved = restore_config(workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  if not saved:
    return config
  given = json.loads(config.to_json_best_effort())
  for field in trained_function_fields(config):
    found, value = _lookup(saved, field)
    if not found or value == _lookup(given, field)[1]:
      continue
    section, _, key = field.rpartition('.')
    node = config[section] if section else config
    old = node[key]
    if field in explicit:
      raise ValueError(
          f'{workdir} was trained with {field}={value!r}, but the command line sets '
          f'{field}={old!r}: a checkpoint is evaluated only as the model it was trained as '
          '(drop the flag, or point --workdir at a run trained with it)'
      )
    logging.warning('%s was trained with %s=%r; using it instead of %r', workdir, field, value, old)
    node[key] = type(old)(value) if isinstance(old, (tuple, float)) else value
  return config


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


if __name__ == '__main__':
  if len(sys.argv) != 4 or sys.argv[1] != 'export':
    sys.exit('usage: python -m diffhand_jax.checkpointing export WORKDIR OUT_WORKDIR')
  print(f'exported step {export_params(sys.argv[2], sys.argv[3])} to {sys.argv[3]}')
