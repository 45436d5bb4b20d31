"""Training: train state, the diffusion train step, data parallelism, the loop.

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
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffhand_jax import checkpointing
from diffhand_jax import diffusion as diffusion_lib
from diffhand_jax import evaluate as evaluate_lib
from diffhand_jax import input_pipeline
from diffhand_jax import logging_utils
from diffhand_jax import losses
from diffhand_jax import models
from diffhand_jax import optim
from diffhand_jax import parallel
from diffhand_jax import procedural_mano
from diffhand_jax import weights

# loss_fn(params, batch, example_keys [B] keys) -> (loss scalar, aux scalars)
LossFn = Callable[
    [Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]
]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; the data position is `step` itself.

  step: int32 [], number of updates applied.
  params: model parameters (float32).
  opt_state: optax state.
  ema_params: EMA of params (config.optim.ema_decay > 0), else None.
  rng: uint32 [2], fixed for the run; step keys are fold_in(rng, step).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


class Task(NamedTuple):
  """What the generic loop trains.

  init_params: rng -> params.
  loss_fn: see LossFn; averages over its batch.
  train_iterator: start_step -> iterator of per-process numpy batches, the
    same batches from step k on whatever the start (ARCHITECTURE.md).
  evaluate: (params, step) -> dict of metrics (lower-is-better
    config.train.best_metric among them), or None to skip evaluation.
  """

  init_params: Callable[[jax.Array], Any]
  loss_fn: LossFn
  train_iterator: Callable[[int], Iterator[Mapping[str, np.ndarray]]]
  evaluate: Optional[Callable[[Any, int], Mapping[str, float]]] = None


def create_train_state(
    params, optimizer: optax.GradientTransformation, rng: jax.Array, ema_decay: float
) -> TrainState:
  """Step 0: `params`, a fresh optimizer state, the EMA (a copy of `params`
  when ema_decay > 0) and the run's key `rng`."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      ema_params=jax.tree.map(jnp.array, params) if ema_decay > 0 else None,
      rng=rng,
  )


def eval_params(state: TrainState):
  """The parameters to evaluate: the EMA when kept, else the raw params."""
  return state.params if state.ema_params is None else state.ema_params


# ---- The train step ----
def example_keys(step_key: jax.Array, first_index, batch_size: int) -> jax.Array:
  """One key per example, from its index in the global batch.

  Keying by the global example index (not by device) makes the noise a
  function of the example alone, so jit over any mesh, pmap and a single
  device draw the same noise for the same global batch.

  Returns:
    [batch_size, 2] uint32 keys.
  """
  indices = first_index + jnp.arange(batch_size)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, indices)


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_decay: float,
    axis_name: Optional[str] = None,
):
  """One optimiser update.

  Args:
    state: the TrainState (donated by the compiled versions).
    batch: jit: the global batch; pmap: this device's slice.
    axis_name: the pmap axis to average gradients/metrics over, or None.
  Returns:
    (new state, metrics: loss, aux losses, grad_norm, lr — global averages).
  """
  batch_size = jax.tree.leaves(batch)[0].shape[0]
  first = 0 if axis_name is None else (jax.lax.axis_index(axis_name) * batch_size)
  keys = example_keys(jax.random.fold_in(state.rng, state.step), first, batch_size)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, keys)
  if axis_name is not None:
    # Equal per-device batches without padding (training batches are all
    # valid): the mean of the device means is the global mean.
    grads, loss, aux = jax.lax.pmean((grads, loss, aux), axis_name)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = optim.update_ema(ema, params, ema_decay, state.step + 1)
  # param_norm is finite iff the new params are: the NaN guard checks it so a
  # diverged state (finite loss, overflowing update) is never saved.
  metrics = dict(
      aux,
      loss=loss,
      grad_norm=optax.global_norm(grads),
      param_norm=optax.global_norm(params),
      lr=schedule(state.step),
  )
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
  return new_state, metrics


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
) -> TrainState:
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
  state = create_train_state(task.init_params(init_rng), optimizer, state_rng, ema_decay)

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
    state = state.replace(params=checkpointing.load_params_into(state.params, config.init_from))
    if state.ema_params is not None:
      state = state.replace(ema_params=jax.tree.map(jnp.array, state.params))

  # ---- Parallelism ----
  step_fn = functools.partial(
      train_step,
      loss_fn=task.loss_fn,
      optimizer=optimizer,
      schedule=schedule,
      ema_decay=ema_decay,
  )
  skip_nonfinite = bool(train_config.skip_nonfinite)
  if skip_nonfinite:
    step_fn = skip_nonfinite_updates(step_fn)
  runner = parallel.data_parallel(step_fn, train_config.parallelism, devices)
  parallel.check_batch_divisible(
      int(train_config.global_batch_size), runner.num_devices, 'train.global_batch_size'
  )
  placed = runner.put_state(state)
  del state

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
    saver.save(step, runner.get_state(placed), config, metrics=metrics)
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
          eval_metrics = task.evaluate(eval_params(runner.get_state(placed)), done)
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
  return runner.get_state(placed)


def _scalar_metrics(metrics):
  if not metrics:
    return None
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


# ---- The DiffHand task ----
# Timestep buckets of the logged x0 loss: [0, 250), [250, 500), [500, 750), [750, T - 1) and
# t = T - 1 alone (pure noise, where only the image can tell the hand).
T_BUCKET_EDGES = (0, 250, 500, 750)


def noisy_input(
    schedule, x0: jax.Array, keys: jax.Array, diffusion: bool, t_max_fraction: float = 0.0
):
  """x_t and t for the training forward pass (DESIGN §2, §5).

  Each example's t is T - 1 with probability `t_max_fraction`, else uniform in [0, T): with
  t uniform, x_t reveals the hand's orientation for most t, and the decoder can learn to
  ignore the image; at t = T - 1 the image is the only source of the answer.

  Args:
    schedule: diffusion.Schedule.
    x0: [B, N, 3] clean vertices in diffusion space.
    keys: [B, 2] per-example keys (timestep and noise drawn from each).
    diffusion: False (the regressor ablation): x_t = 0, t = 0.
    t_max_fraction: in [0, 1].
  Returns:
    x_t [B, N, 3], t [B] int32.
  """
  if not 0.0 <= t_max_fraction <= 1.0:
    raise ValueError(f't_max_fraction must be in [0, 1], got {t_max_fraction}')
  if not diffusion:
    return jnp.zeros_like(x0), jnp.zeros((x0.shape[0],), jnp.int32)
  last = schedule.num_timesteps - 1

  def draw(key):
    t_key, max_key, noise_key = jax.random.split(key, 3)
    t = jax.random.randint(t_key, (), 0, schedule.num_timesteps)
    t = jnp.where(jax.random.uniform(max_key) < t_max_fraction, last, t)
    return t, jax.random.normal(noise_key, x0.shape[1:], x0.dtype)

  t, noise = jax.vmap(draw)(keys)
  return diffusion_lib.q_sample(schedule, x0, t, noise), t.astype(jnp.int32)


def x0_loss_by_timestep(per_example: jax.Array, t: jax.Array, num_timesteps: int):
  """Mean per-example x0 loss in each timestep bucket (T_BUCKET_EDGES, then t = T - 1).

  Args:
    per_example: [B] x0 losses.
    t: [B] int timesteps.
    num_timesteps: T.
  Returns:
    {'loss_x0_t{low}': mean over the examples with low <= t < next edge (t < T - 1 for the
    last), 'loss_x0_tmax': mean over t = T - 1}; 0 for a bucket without examples.
  """
  last = num_timesteps - 1
  highs = T_BUCKET_EDGES[1:] + (last,)
  buckets = {f'loss_x0_t{low}': (t >= low) & (t < high) for low, high in zip(T_BUCKET_EDGES, highs)}
  buckets['loss_x0_tmax'] = t == last
  return {
      name: jnp.sum(jnp.where(inside, per_example, 0.0)) / jnp.maximum(jnp.sum(inside), 1)
      for name, inside in buckets.items()
  }


def make_loss_fn(model, config: ml_collections.ConfigDict, faces) -> LossFn:
  """DESIGN §5 losses of one training forward pass on a batch.

  The vertex scale, the schedule and the diffusion switch are the model's; config gives the
  loss weights (config.loss) and config.train.t_max_fraction.

  Args:
    model: the DiffHand module.
    faces: [F, 3] int mesh faces (for the normal-consistency term).
  """
  schedule = diffusion_lib.cosine_schedule(model.num_timesteps, model.cosine_s)
  regressor = jnp.asarray(model.joint_regressor.array)
  faces = np.asarray(faces, np.int32)
  t_max_fraction = float(config.train.t_max_fraction)

  def loss_fn(params, batch, keys):
    x0 = batch['verts'] / model.vertex_scale
    x_t, t = noisy_input(schedule, x0, keys, model.diffusion, t_max_fraction)
    out = model.apply({'params': params}, batch['image'], x_t, t, depth=batch.get('depth'))
    loss, terms = losses.compute_losses(
        out,
        batch,
        regressor=regressor,
        faces=faces,
        vertex_scale=model.vertex_scale,
        weights=config.loss,
    )
    if model.diffusion:
      terms.update(
          x0_loss_by_timestep(
              losses.per_example_squared_error(out['x0'], x0), t, model.num_timesteps
          )
      )
    return loss, terms

  return loss_fn


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
      loss_fn=make_loss_fn(model, config, faces),
      train_iterator=lambda start: iter(
          input_pipeline.create_train_iterator(config, start_step=start)
      ),
      evaluate=evaluate,
  )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, periodic_eval: bool = True
) -> TrainState:
  """`--mode=train`: trains DiffHand per `config` in `workdir` (resuming).

  periodic_eval=False skips the evaluations during and at the end of training (the demo
  evaluates on an unseen seed afterwards instead).
  """
  checkpointing.check_writable(workdir)  # before the data set is built
  task = build_task(config, workdir)
  if not periodic_eval:
    task = task._replace(evaluate=None)
  return run_training(config, workdir, task)
