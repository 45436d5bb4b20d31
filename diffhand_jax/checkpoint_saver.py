"""Asynchronous checkpoint saves whose failure stops training at the next step.

Orbax finishes a save in background threads and, on failure, logs it and moves on; `AsyncSaver`
surfaces the error at the next `check` (every step) instead of at the next save.
"""

import orbax.checkpoint as ocp

from diffhand_jax import checkpointing


class CheckpointSaveError(RuntimeError):
  """An asynchronous checkpoint save failed; the checkpoints written before are intact."""


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
      checkpointing.save(self.manager, step, state, config, metrics=metrics)
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
        f'({type(cause).__name__}: {checkpointing.error_summary(cause)}); training stopped. Checkpoints '
        f'written before are intact: latest step {max(intact) if intact else None}.'
    )
