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
    if self._writer is None:
      return
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


class ProgressLogger:
  """Prints `step, steps/s, ETA, loss, lr, ...` lines (process 0 only)."""

  def __init__(self, num_steps: int, start_step: int = 0):
    self._num_steps = num_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

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
    ordered = ['loss', 'lr'] + sorted(k for k in metrics if k not in ('loss', 'lr'))
    parts += [f'{k} {float(metrics[k]):.4g}' for k in ordered if k in metrics]
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
