"""The DiffHand train step: train state, per-example keys, the noisy input and the losses.

Pure functions of arrays and configs, free of the input pipeline and of TensorFlow, so that
benchmarks and accelerator jobs can build and time the exact step that train.py runs.
"""

from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffhand_jax import diffusion as diffusion_lib
from diffhand_jax import losses
from diffhand_jax import optim

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
    last), 'loss_x0_tmax': mean over t = T - 1}, each with its example count
    'examples_x0_t{low}' / 'examples_x0_tmax'. The mean of a bucket without examples is 0 here
    and its count 0: the logs leave it out (`logging_utils.without_empty`).
  """
  last = num_timesteps - 1
  highs = T_BUCKET_EDGES[1:] + (last,)
  buckets = {f'x0_t{low}': (t >= low) & (t < high) for low, high in zip(T_BUCKET_EDGES, highs)}
  buckets['x0_tmax'] = t == last
  out = {}
  for name, inside in buckets.items():
    count = jnp.sum(inside)
    out[f'loss_{name}'] = jnp.sum(jnp.where(inside, per_example, 0.0)) / jnp.maximum(count, 1)
    out[f'examples_{name}'] = count.astype(jnp.float32)
  return out


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
