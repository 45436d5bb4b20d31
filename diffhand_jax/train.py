"""Training: the loop over a Task (data parallelism, checkpoints, guards) and the DiffHand task.

The loop (`run_training`) is generic over a `Task` (init, loss, data, eval) so
that its machinery (jit/pmap, checkpoints, resume, preemption, NaN guard) is
tested with a tiny stand-in; `train_and_evaluate` builds the DiffHand task.
There is no separate eval step here: the periodic evaluation is the sampler of
evaluate.py (`Task.evaluate`), the same code as `--mode=eval`.
"""

import functools
import signal
import threading
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from diffhand_jax import checkpointing
from diffhand_jax import evaluate as evaluate_lib
from diffhand_jax import flat_state
from diffhand_jax import input_pipeline
from diffhand_jax import logging_utils
from diffhand_jax import models
from diffhand_jax.models import encoder as encoder_lib
from diffhand_jax import optim
from diffhand_jax import parallel
from diffhand_jax import procedural_mano
from diffhand_jax import step_cache
from diffhand_jax import train_step as train_step_lib
from diffhand_jax import weights


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
def run_training(
    config: ml_collections.ConfigDict, workdir: str, task: Task, devices=None
) -> train_step_lib.TrainState:
  """Trains `task` to config.train.num_steps, resuming from workdir if possible.

  Returns the final (single-copy) TrainState; on SIGTERM saves and returns the
  state reached so far (re-running the same command resumes).
  """
  train_config = config.train
  num_steps = int(train_config.num_steps)
  ema_decay = float(config.optim.ema_decay)
  is_writer = jax.process_index() == 0

  # ---- Optimiser and state ----
  schedule = optim.learning_rate_schedule(config.optim, num_steps)
  optimizer = optim.make_optimizer(config.optim, num_steps)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  state = train_step_lib.create_train_state(
      task.init_params(init_rng), optimizer, state_rng, ema_decay
  )

  # ---- Checkpoints: resume ----
  # Before any training time is spent: an unwritable workdir or a full disk fails here.
  checkpointing.check_writable(workdir, 2 * checkpointing.tree_nbytes(state))
  manager = checkpointing.make_manager(
      workdir, keep=int(train_config.keep_checkpoints), best_metric=train_config.best_metric or None
  )
  # The newest readable checkpoint: unreadable newer ones are moved aside with a warning.
  start_step, restored = checkpointing.restore_latest_good(
      manager, target=state, move_unreadable=is_writer
  )
  start_step = start_step or 0
  if start_step:
    state = restored
    logging.info('Resumed from %s at step %d', manager.directory, start_step)
  elif config.init_from:
    state = state.replace(
        params=checkpointing.load_params_into(
            state.params, config.init_from, adapt=encoder_lib.init_from_adapter(config.model)
        )
    )
    if state.ema_params is not None:
      state = state.replace(ema_params=jax.tree.map(jnp.array, state.params))

  # ---- The compiled step's state layout (flat_state.py) ----
  layout = flat_state.step_layout(config, num_steps, task.loss_fn, optimizer, state)

  # ---- Parallelism ----
  step_fn = functools.partial(
      train_step_lib.train_step,
      loss_fn=layout.loss_fn,
      optimizer=layout.optimizer,
      schedule=schedule,
      ema_decay=ema_decay,
  )
  skip_nonfinite = bool(train_config.skip_nonfinite)
  if skip_nonfinite:
    step_fn = skip_nonfinite_updates(step_fn)
  # The step is built from the config: the task's loss and the optimiser and schedule here.
  # config.train.step_cache (a CPU tool, off by default): keep the lowered step on disk.
  use_cache = task.cacheable and bool(train_config.get('step_cache', False))
  cache_key = step_cache.config_key(config) if use_cache else None
  runner = parallel.data_parallel(step_fn, train_config.parallelism, devices, cache_key=cache_key)
  parallel.check_batch_divisible(
      int(train_config.global_batch_size), runner.num_devices, 'train.global_batch_size'
  )
  placed = runner.put_state(layout.to_step(state))
  del state

  def tree_state():
    """The current state in the parameter-tree layout (checkpoints, evaluation)."""
    return layout.from_step(runner.get_state(placed))

  # ---- Data ----
  batches = task.train_iterator(start_step)

  # ---- Train loop ----
  writer = logging_utils.MetricWriter(workdir, 'train')
  progress = logging_utils.ProgressLogger(num_steps, start_step)
  last_saved = start_step if start_step else None
  pending = None  # (step index, device metrics): checked one step late so
  #                  the host never waits on the step it has just dispatched.

  saver = checkpointing.AsyncSaver(manager)
  num_skipped = 0  # updates dropped as non-finite (train.skip_nonfinite), this session

  def guard(step, metrics):
    """check_finite, or, with train.skip_nonfinite, counts a dropped update."""
    nonlocal num_skipped
    if skip_nonfinite and float(metrics['skipped']):
      num_skipped += 1
      logging.warning(
          'Skipped the non-finite update of train step %d (loss %s, grad_norm %s); %d '
          'skipped so far.',
          step,
          float(metrics['loss']),
          float(metrics['grad_norm']),
          num_skipped,
      )
      return
    check_finite(step, metrics, last_saved)

  def save(step, metrics=None):
    nonlocal last_saved
    saver.save(step, tree_state(), config, metrics=metrics)
    last_saved = step

  # An error (e.g. a non-finite loss) must not lose the async saves in flight.
  try:
    with PreemptionFlag() as preemption:
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
        if skip_nonfinite:
          host_metrics['skipped'] = num_skipped  # logged: the running count
        pending = None
        if log_now:
          progress.log(done, host_metrics)
          writer.scalars(done, host_metrics)
        eval_metrics = None
        if eval_now:  # the task writes its own eval summaries
          eval_metrics = task.evaluate(layout.eval_params(runner.get_state(placed)), done)
          best = train_config.best_metric
          if eval_metrics and best and best not in eval_metrics:
            raise ValueError(
                f'config.train.best_metric={best!r} is not an '
                f'eval metric (have: {sorted(eval_metrics)})'
            )
        if save_now or eval_metrics or preempted:
          save(done, _scalar_metrics(eval_metrics))
        if preempted:
          if is_writer:
            print(
                f'SIGTERM: saved a checkpoint at step {done}; re-run the '
                'same command to resume.',
                flush=True,
            )
          break
      if pending is not None:
        guard(pending[0], jax.device_get(pending[1]))
  finally:
    try:
      saver.close()  # raises CheckpointSaveError if the last save failed
    finally:
      writer.close()
  return tree_state()


def _scalar_metrics(metrics):
  if not metrics:
    return None
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


# ---- The DiffHand task ----
def build_task(config: ml_collections.ConfigDict, workdir: str) -> Task:
  """The DiffHand model, losses, train stream and periodic evaluation."""
  input_pipeline.check_dataset_available(config)
  # ---- Model ----
  model = models.build_model(config)
  faces = procedural_mano.load_hand_model(config).faces
  size = int(config.data.image_size)
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  depth = jnp.zeros((1, size, size, 1), jnp.float32) if config.model.use_depth else None

  def init(rng):
    # config.model.pretrained_path (a timm checkpoint or its converted .msgpack) replaces
    # the encoder's initial values; '' keeps them. init_from, if set, is applied after this.
    return weights.load_pretrained_encoder(models.init_params(model, rng, images, depth), config)

  # ---- Evaluation ----
  eval_writer = logging_utils.MetricWriter(workdir, 'eval')
  sample_fn = evaluate_lib.make_sample_fn(model, config)  # compiled once
  diagnostics_fn = evaluate_lib.make_diagnostics_fn(model)

  def evaluate(params, step):
    return evaluate_lib.evaluate(
        config,
        params,
        model=model,
        workdir=workdir,
        step=step,
        writer=eval_writer,
        sample_fn=sample_fn,
        diagnostics_fn=diagnostics_fn,
    )

  return Task(
      init_params=init,
      loss_fn=train_step_lib.make_loss_fn(model, config, faces),
      train_iterator=lambda start: iter(
          input_pipeline.create_train_iterator(config, start_step=start)
      ),
      evaluate=evaluate,
      cacheable=True,
  )


def resolve_epochs(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """With config.train.num_epochs > 0: a copy whose num_steps (and warm-up, checkpoint and eval
  intervals) are set for that many epochs of the prepared training split, counted from it
  (`configs/common.epoch_schedule`); else `config` itself."""
  if float(config.train.get('num_epochs', 0.0)) <= 0:
    return config
  count = input_pipeline.train_split_size(config)
  resolved = ml_collections.ConfigDict(config.to_dict())
  common.epoch_schedule(resolved, count)
  if jax.process_index() == 0:
    logging.info(
        'Training split of %r: %d examples (counted); %g epochs at batch %d = %d steps.',
        config.data.name,
        count,
        float(config.train.num_epochs),
        int(config.train.global_batch_size),
        resolved.train.num_steps,
    )
  return resolved


def warn_if_from_scratch(config: ml_collections.ConfigDict) -> bool:
  """Warns (and returns True) when a real-data run starts its encoder from random weights.

  The paper's recipe fine-tunes an ImageNet-pretrained encoder; training DeiT-Large or HRNet
  from scratch on FreiHAND / DexYCB / HO-3D is rarely what was meant. Runs that start from
  another run (`init_from`) and the synthetic default (trained from scratch by design) are quiet.
  """
  if config.data.name == 'synthetic' or config.model.pretrained_path or config.init_from:
    return False
  logging.warning(
      'config.model.pretrained_path is empty: the %s-%s encoder starts from random weights, '
      'while the paper fine-tunes ImageNet weights. Pass '
      '--config.model.pretrained_path=/path/to/timm_weights.safetensors (README, "Real data").',
      config.model.encoder,
      config.model.encoder_size,
  )
  return True


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, periodic_eval: bool = True
) -> train_step_lib.TrainState:
  """`--mode=train`: trains DiffHand per `config` in `workdir` (resuming).

  periodic_eval=False skips the evaluations during and at the end of training (the demo
  evaluates on an unseen seed afterwards instead).
  """
  checkpointing.check_writable(workdir)  # before the data set is built
  warn_if_from_scratch(config)
  config = resolve_epochs(config)
  task = build_task(config, workdir)
  if not periodic_eval:
    task = task._replace(evaluate=None)
  return run_training(config, workdir, task)
