"""Console progress lines and TensorBoard scalars/images; only process 0 writes."""

import json
import logging as py_logging
import os
import time
from typing import Mapping, Optional

from absl import logging as absl_logging
import jax
import numpy as np
import tensorflow as tf


def scalars_path(workdir: str, name: str) -> str:
  """<workdir>/metrics_<name>.jsonl: one JSON object {step, scalars...} per logged step."""
  return os.path.join(workdir, f'metrics_{name}.jsonl')


def read_scalars(workdir: str, name: str) -> list[dict]:
  """The records `MetricWriter(workdir, name).scalars` appended, in order ([] if none)."""
  path = scalars_path(workdir, name)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  """TensorBoard writer (tf.summary) under <workdir>/tensorboard/<name>; scalars are also
  appended to `scalars_path(workdir, name)` (plain JSON lines, for plots without TensorBoard).

  A no-op on processes other than 0, so callers never branch on the process.
  """

  def __init__(self, workdir: str, name: str = 'train'):
    self._writer = None
    self._jsonl = scalars_path(workdir, name)
    if jax.process_index() == 0:
      tf.config.set_visible_devices([], 'GPU')  # keep TF off the accelerators
      self._writer = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard', name))

  def scalars(self, step: int, scalars: Mapping[str, float]):
    """Writes the 0-d values of `scalars`, but no mean of an empty bucket (`without_empty`)."""
    if self._writer is None:
      return
    scalars = without_empty(scalars)
    scalars = {key: float(value) for key, value in scalars.items() if np.ndim(value) == 0}
    with self._writer.as_default():
      for key, value in scalars.items():
        tf.summary.scalar(key, value, step=step)
    self._writer.flush()
    with open(self._jsonl, 'a') as f:
      f.write(json.dumps({'step': int(step), **scalars}) + '\n')

  def images(self, step: int, images: Mapping[str, np.ndarray]):
    """images: name -> uint8 or [0, 1] float array [n, H, W, 3] (or [H, W, 3])."""
    if self._writer is None:
      return
    with self._writer.as_default():
      for key, value in images.items():
        value = np.asarray(value)
        if value.ndim == 3:
          value = value[None]
        tf.summary.image(key, value, step=step, max_outputs=len(value))
    self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


def without_empty(scalars: Mapping[str, float]) -> dict:
  """`scalars` without each 'loss_<name>' whose companion count 'examples_<name>' is 0.

  A per-bucket mean over no examples (e.g. a timestep bucket a batch did not sample) has no
  value; it is left out of the logs instead of being written as 0.
  """
  empty = {
      'loss_' + key[len('examples_') :]
      for key, value in scalars.items()
      if key.startswith('examples_') and np.ndim(value) == 0 and float(value) == 0
  }
  return {key: value for key, value in scalars.items() if key not in empty}


class ProgressLogger:
  """Prints one short line per log step (process 0 only): step, steps/s, ETA and `keys`.

  Everything else a step returns goes to TensorBoard and metrics_train.jsonl (`MetricWriter`);
  the line stays within a terminal's width.
  """

  def __init__(self, num_steps: int, start_step: int = 0, keys=('loss', 'lr')):
    self._num_steps = num_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._keys = tuple(keys)

  def log(self, step: int, metrics: Mapping[str, float]) -> Optional[str]:
    """step: the number of completed steps. Returns the printed line."""
    now = time.perf_counter()
    steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self._num_steps - step) / max(steps_per_sec, 1e-9)
    parts = [
        f'step {step}/{self._num_steps}',
        f'{steps_per_sec:.3g} steps/s',
        f'ETA {_format_duration(eta)}',
    ]
    shown = without_empty(metrics)
    parts += [f'{k} {float(shown[k]):.4g}' for k in self._keys if k in shown]
    line = ' | '.join(parts)
    if jax.process_index() == 0:
      print(line, flush=True)
    return line


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}' if hours else (f'{minutes}:{seconds:02d}')


def quiet_library_logs(packages=('orbax', 'jax/_src', 'tensorflow_datasets')):
  """Drops INFO/DEBUG records that `packages` log through absl (orbax writes
  dozens of lines per checkpoint), keeping warnings and errors."""
  markers = tuple(f'/{p}/' for p in packages)

  def keep(record):
    return record.levelno >= py_logging.WARNING or not any(m in record.pathname for m in markers)

  absl_logging.get_absl_handler().addFilter(keep)
