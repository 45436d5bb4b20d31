"""The generic training loop: data parallelism, checkpoints, resume, preemption, NaN guard.

`run_training` trains any `Task` (init, loss, data, eval), so that its machinery is tested with a
tiny stand-in; `train.py` builds the DiffHand task. There is no separate eval step here: the
periodic evaluation is the task's (for DiffHand the sampler of evaluate.py, the same code as
`--mode=eval`).
"""

import functools
import signal
import threading
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffhand_jax import checkpointing
from diffhand_jax import checkpoint_saver
from diffhand_jax import flat_state
from diffhand_jax import logging_utils
from diffhand_jax import optim
from diffhand_jax import parallel
from diffhand_jax import step_cache
from diffhand_jax import train_step as train_step_lib


class Task(NamedTuple):
  """What the generic loop trains.

  init_params: rng -> params.
  loss_fn: see train_step.LossFn; averages over its batch.
  train_iterator: start_step -> iterator of per-process numpy batches, the
    same batches from step k on whatever the start (ARCHITECTURE.md).
  evaluate: (params, step) -> dict of metrics (lower-is-better
    config.train.best_metric among them), or None to skip evaluation.
  cacheable: True when everything `loss_fn` is built from is determined by the config given
    to `run_training` (the DiffHand task): with config.train.step_cache on, the lowered step
    is then kept on disk beside JAX's compilation cache under `step_cache.config_key(config)`.
    False (a task with its own functions): traced every run.
  """

  init_params: Callable[[jax.Array], Any]
  loss_fn: train_step_lib.LossFn
  train_iterator: Callable[[int], Iterator[Mapping[str, np.ndarray]]]
  evaluate: Optional[Callable[[Any, int], Mapping[str, float]]] = None
  cacheable: bool = False
  init_from_adapter: Optional[Callable[..., Any]] = None
  watch: Sequence[str] = ()


# ---- Guards: preemption and non-finite losses ----
class PreemptionFlag:
  """Set by SIGTERM while installed; the loop saves and stops at the next step."""

  def __init__(self):
    self._requested = False
    self._previous = None

  @property
  def requested(self) -> bool:
    """True on every process once any process got SIGTERM (the save that
    follows is collective, so all processes must take the branch together)."""
    if jax.process_count() == 1:
      return self._requested
    return bool(np.any(multihost_utils.process_allgather(np.array(self._requested))))

  def handler(self, signum, frame):  # pylint: disable=unused-argument
    self._requested = True

  def __enter__(self):
    # Signal handlers can only be installed from the main thread.
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self.handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def check_finite(step: int, metrics: Mapping[str, Any], last_good: Any):
  """Raises FloatingPointError naming the step when loss, gradients or params
  are not finite.

  Args:
    step: the 0-based index of the update that produced `metrics`.
    last_good: the last checkpointed step (named in the message).
  """
  for name in ('loss', 'grad_norm', 'param_norm'):
    value = float(metrics[name])
    if not np.isfinite(value):
      raise FloatingPointError(
          f'non-finite {name} ({value}) in train step {step} (the update from '
          f'state step {step} to {step + 1}); training stopped without saving '
          f'it. Last good checkpoint: step {last_good}.'
      )


def skip_nonfinite_updates(step_fn):
  """Wraps a train step so that an update with a non-finite loss, gradient norm or new
  parameters is dropped (config.train.skip_nonfinite).

  The state keeps its params, optimiser state and EMA; only `step` advances, so the data
  stream stays where an applied update would have left it. metrics['skipped'] is 1.0 for a
  dropped update, else 0.0. The values checked are global averages, so every device (and
  every process) takes the same decision.
  """

  def step(state, batch, axis_name=None):
    new_state, metrics = step_fn(state, batch, axis_name=axis_name)
    finite = jnp.all(
        jnp.isfinite(jnp.stack([metrics['loss'], metrics['grad_norm'], metrics['param_norm']]))
    )
    kept = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (new_state.params, new_state.opt_state, new_state.ema_params),
        (state.params, state.opt_state, state.ema_params),
    )
    new_state = new_state.replace(params=kept[0], opt_state=kept[1], ema_params=kept[2])
    return new_state, dict(metrics, skipped=1.0 - finite.astype(jnp.float32))

  return step


# ---- The loop ----
def _initial_state(config, workdir: str, task: Task, optimizer):
  """(state, checkpoint manager, start step): resumed from the newest readable checkpoint, else
  initialised (and `config.init_from`'s params loaded)."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  ema_decay = float(config.optim.ema_decay)
  state = train_step_lib.create_train_state(
      task.init_params(init_rng), optimizer, state_rng, ema_decay
  )
  # Before any training time is spent: an unwritable workdir or a full disk fails here.
  checkpointing.check_writable(workdir, 2 * checkpointing.tree_nbytes(state))
  manager = checkpointing.make_manager(
      workdir,
      keep=int(config.train.keep_checkpoints),
      best_metric=config.train.best_metric or None,
  )
  # The newest readable checkpoint: unreadable newer ones are moved aside with a warning.
  start_step, restored = checkpointing.restore_latest_good(
      manager, target=state, move_unreadable=jax.process_index() == 0
  )
  if start_step:
    logging.info('Resumed from %s at step %d', manager.directory, start_step)
    return restored, manager, start_step
  if config.init_from:
    state = state.replace(
        params=checkpointing.load_params_into(
            state.params, config.init_from, adapt=task.init_from_adapter
        )
    )
    if state.ema_params is not None:
      state = state.replace(ema_params=jax.tree.map(jnp.array, state.params))
  return state, manager, 0


def _runner(config, task: Task, layout, devices) -> parallel.DataParallel:
  """The compiled step (`train_step` over the layout's loss and optimiser) for the devices."""
  num_steps = int(config.train.num_steps)
  step_fn = functools.partial(
      train_step_lib.train_step,
      loss_fn=layout.loss_fn,
      optimizer=layout.optimizer,
      schedule=optim.learning_rate_schedule(config.optim, num_steps),
      ema_decay=float(config.optim.ema_decay),
  )
  if config.train.skip_nonfinite:
    step_fn = skip_nonfinite_updates(step_fn)
  # config.train.step_cache (a CPU tool, off by default): keep the lowered step on disk. The
  # step is built from the config: the task's loss and the optimiser and schedule here.
  use_cache = task.cacheable and bool(config.train.get('step_cache', False))
  cache_key = step_cache.config_key(config) if use_cache else None
  runner = parallel.data_parallel(step_fn, config.train.parallelism, devices, cache_key=cache_key)
  parallel.check_batch_divisible(
      int(config.train.global_batch_size), runner.num_devices, 'train.global_batch_size'
  )
  return runner


class _Guard:
  """`check_finite` per step, or with config.train.skip_nonfinite a count of dropped updates."""

  def __init__(self, skip_nonfinite: bool):
    self.skip_nonfinite = skip_nonfinite
    self.num_skipped = 0  # updates dropped as non-finite, this session
    self.last_saved = None  # the last checkpointed step (named by the error)

  def __call__(self, step: int, metrics: Mapping[str, Any]):
    if self.skip_nonfinite and float(metrics['skipped']):
      self.num_skipped += 1
      logging.warning(
          'Skipped the non-finite update of train step %d (loss %s, grad_norm %s); %d '
          'skipped so far.',
          step,
          float(metrics['loss']),
          float(metrics['grad_norm']),
          self.num_skipped,
      )
      return
    check_finite(step, metrics, self.last_saved)


def _evaluate(task: Task, params, done: int, best_metric: str):
  """The task's evaluation at step `done` (it writes its own summaries); checks best_metric."""
  eval_metrics = task.evaluate(params, done)
  if eval_metrics and best_metric and best_metric not in eval_metrics:
    raise ValueError(
        f'config.train.best_metric={best_metric!r} is not an '
        f'eval metric (have: {sorted(eval_metrics)})'
    )
  return eval_metrics


def run_training(
    config: ml_collections.ConfigDict, workdir: str, task: Task, devices=None
) -> train_step_lib.TrainState:
  """Trains `task` to config.train.num_steps, resuming from workdir if possible.

  Returns the final (single-copy) TrainState; on SIGTERM saves and returns the
  state reached so far (re-running the same command resumes).
  """
  num_steps = int(config.train.num_steps)
  optimizer = optim.make_optimizer(config.optim, num_steps)
  state, manager, start_step = _initial_state(config, workdir, task, optimizer)
  # The compiled step's state layout (flat_state.py).
  layout = flat_state.step_layout(config, num_steps, task.loss_fn, optimizer, state)
  runner = _runner(config, task, layout, devices)
  placed = runner.put_state(layout.to_step(state))
  del state
  guard = _Guard(bool(config.train.skip_nonfinite))
  guard.last_saved = start_step or None
  writer = logging_utils.MetricWriter(workdir, 'train')
  saver = checkpoint_saver.AsyncSaver(manager)
  # An error (e.g. a non-finite loss) must not lose the async saves in flight.
  try:
    with PreemptionFlag() as preemption:
      placed = _loop(
          config,
          task,
          runner,
          placed,
          layout,
          (start_step, num_steps),
          guard,
          saver,
          writer,
          preemption,
      )
  finally:
    try:
      saver.close()  # raises CheckpointSaveError if the last save failed
    finally:
      writer.close()
  return layout.from_step(runner.get_state(placed))


def _loop(config, task, runner, placed, layout, steps, guard, saver, writer, preemption):
  """Steps from `steps[0]` to `steps[1]`: log, evaluate, save and stop on SIGTERM on time.

  Returns the placed state reached.
  """
  start_step, num_steps = steps
  train_config = config.train
  keys = ('loss', 'lr', *task.watch) + (('skipped',) if guard.skip_nonfinite else ())
  progress = logging_utils.ProgressLogger(num_steps, start_step, keys=keys)
  batches = task.train_iterator(start_step)
  pending = None  # (step index, device metrics): checked one step late so
  #                  the host never waits on the step it has just dispatched.
  for step in range(start_step, num_steps):
    saver.check()  # a failed async save stops training at once
    placed, metrics = runner.step(placed, runner.put_batch(next(batches)))
    if pending is not None:
      guard(pending[0], jax.device_get(pending[1]))
    pending = (step, metrics)
    done = step + 1
    is_last = done == num_steps
    log_now = done % train_config.log_every == 0 or is_last
    eval_now = task.evaluate is not None and (done % train_config.eval_every == 0 or is_last)
    save_now = done % train_config.checkpoint_every == 0 or is_last
    preempted = preemption.requested
    if not (log_now or eval_now or save_now or preempted):
      continue
    host_metrics = jax.device_get(metrics)
    guard(step, host_metrics)
    if guard.skip_nonfinite:
      host_metrics['skipped'] = guard.num_skipped  # logged: the running count
    pending = None
    if log_now:
      progress.log(done, host_metrics)
      writer.scalars(done, host_metrics)
    eval_metrics = None
    if eval_now:
      params = layout.eval_params(runner.get_state(placed))
      eval_metrics = _evaluate(task, params, done, train_config.best_metric)
    if save_now or eval_metrics or preempted:
      saver.save(
          done, layout.from_step(runner.get_state(placed)), config, _scalar_metrics(eval_metrics)
      )
      guard.last_saved = done
    if preempted:
      if jax.process_index() == 0:
        print(
            f'SIGTERM: saved a checkpoint at step {done}; re-run the same command to resume.',
            flush=True,
        )
      break
  if pending is not None:
    guard(pending[0], jax.device_get(pending[1]))
  return placed


def _scalar_metrics(metrics):
  if not metrics:
    return None
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
