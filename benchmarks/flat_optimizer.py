"""Probe: the train step with the optimiser, EMA and norms on one flat vector (issue 11).

The synthetic train step's compiled module has ~2,300 top-level fusions outside the model's
forward and backward: the clip, AdamW, decay mask, update and norms run leaf by leaf over the 276
parameter arrays (BENCHMARKS.md, "What the module holds"). This script builds the same step
twice, as the project runs it (parameter tree) and with the training state as flat vectors
(`jax.flatten_util.ravel_pytree`; the model sees the unravelled tree), and prints, side by
side: top-level fusions, XLA compile time, the time to load the serialised executable, the step
time (interleaved rounds) and the largest parameter difference after a few steps.

  .venv/bin/python benchmarks/flat_optimizer.py --config=synthetic --rounds=5
"""

import argparse
import os
import statistics
import sys
import time

import jax
from jax.experimental import serialize_executable
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

# pylint: disable=g-import-not-at-top,wrong-import-position
from diffhand_jax import models
from diffhand_jax import optim
from diffhand_jax import procedural_mano
from diffhand_jax import train_step as train_step_lib
import train_step as bench


def flat_optimizer(optim_config, num_steps: int, decay_mask: jax.Array):
  """`optim.make_optimizer`'s clip + AdamW for a flat vector: the decay mask is a 0/1 vector."""
  weight_decay = float(optim_config.weight_decay)

  def decay(updates, state, params):
    return updates + weight_decay * decay_mask * params, state

  parts = [
      optax.scale_by_adam(),
      optax.GradientTransformation(lambda params: optax.EmptyState(), decay),
      optax.scale_by_learning_rate(optim.learning_rate_schedule(optim_config, num_steps)),
  ]
  if optim_config.grad_clip_norm and optim_config.grad_clip_norm > 0:
    parts.insert(0, optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
  return optax.chain(*parts)


def build_flat(config, tree_state, loss_fn):
  """(jitted flat step, flat state, unravel): the state's params, moments and EMA as vectors."""
  num_steps = int(config.train.num_steps)
  flat_params, unravel = ravel_pytree(tree_state.params)
  mask = ravel_pytree(
      jax.tree.map(lambda p: jnp.full(p.shape, p.ndim > 1, p.dtype), tree_state.params)
  )[0]
  optimizer = flat_optimizer(config.optim, num_steps, mask)
  schedule = optim.learning_rate_schedule(config.optim, num_steps)
  decay = float(config.optim.ema_decay)
  state = dict(
      step=tree_state.step,
      params=flat_params,
      opt_state=optimizer.init(flat_params),
      ema=jnp.array(flat_params) if decay > 0 else None,  # as create_train_state
      rng=tree_state.rng,
  )

  def step(state, batch):
    size = jax.tree.leaves(batch)[0].shape[0]
    keys = train_step_lib.example_keys(jax.random.fold_in(state['rng'], state['step']), 0, size)
    (loss, aux), grads = jax.value_and_grad(
        lambda flat: loss_fn(unravel(flat), batch, keys), has_aux=True
    )(state['params'])
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    params = state['params'] + updates
    ema = state['ema']
    if ema is not None:
      ema = optim.update_ema(ema, params, decay, state['step'] + 1)
    metrics = dict(
        aux,
        loss=loss,
        grad_norm=jnp.linalg.norm(grads),
        param_norm=jnp.linalg.norm(params),
        lr=schedule(state['step']),
    )
    new = dict(state, step=state['step'] + 1, params=params, opt_state=opt_state, ema=ema)
    return new, metrics

  return jax.jit(step, donate_argnums=(0,)), state, unravel


def top_level_fusions(compiled) -> int:
  """Fusion instructions of the entry computation (what the CPU runtime makes thunks of)."""
  text = compiled.as_text()
  entry = text[text.index('\nENTRY') :]
  return sum(' fusion(' in line for line in entry.splitlines())


def profile(name, jitted, state, batch):
  """Compile and executable-load seconds, fusions; returns (compiled, row)."""
  lowered = jitted.lower(state, batch)
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  start = time.perf_counter()
  serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
  load_s = time.perf_counter() - start
  return compiled, dict(
      name=name,
      fusions=top_level_fusions(compiled),
      compile_s=compile_s,
      load_s=load_s,
      mb=len(payload) / 2**20,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='synthetic', help='benchmarks/train_step.py config name')
  parser.add_argument('--rounds', type=int, default=5, help='interleaved timing rounds')
  parser.add_argument('--steps_per_round', type=int, default=3)
  args = parser.parse_args()

  config = bench.make_config(args.config, 'float32', False)
  tree_step, tree_state, batch = bench.build_step(config)
  model_loss = train_step_lib.make_loss_fn(
      models.build_model(config), config, procedural_mano.load_hand_model(config).faces
  )
  flat_step, flat_state, unravel = build_flat(config, tree_state, model_loss)
  # The tree step donates its state: keep a copy of the initial parameters for the check.
  tree_state = jax.tree.map(jnp.array, tree_state)

  tree_compiled, tree_row = profile('parameter tree (as trained)', tree_step, tree_state, batch)
  flat_compiled, flat_row = profile('flat vectors (probe)', flat_step, flat_state, batch)

  # Same updates: a few steps of each from the same start.
  losses = {}
  for _ in range(3):
    tree_state, tree_metrics = tree_compiled(tree_state, batch)
    flat_state, flat_metrics = flat_compiled(flat_state, batch)
    losses.setdefault('tree', []).append(float(tree_metrics['loss']))
    losses.setdefault('flat', []).append(float(flat_metrics['loss']))
  difference = jax.tree.map(
      lambda a, b: float(jnp.max(jnp.abs(a - b))), tree_state.params, unravel(flat_state['params'])
  )
  worst = max(jax.tree.leaves(difference))

  times = {'tree': [], 'flat': []}
  for _ in range(args.rounds):
    for key, fn in (('tree', tree_compiled), ('flat', flat_compiled)):
      state = tree_state if key == 'tree' else flat_state
      start = time.perf_counter()
      for _ in range(args.steps_per_round):
        state, metrics = fn(state, batch)
      jax.block_until_ready(metrics['loss'])
      times[key].append((time.perf_counter() - start) / args.steps_per_round * 1e3)
      if key == 'tree':
        tree_state = state
      else:
        flat_state = state
  ratios = [f / t for f, t in zip(times['flat'], times['tree'])]

  print(
      f'\n{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {args.config} train step, '
      f'jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs, '
      f'1-min load {os.getloadavg()[0]:.1f}\n'
  )
  print(
      '| state layout | top-level fusions | XLA compile s | executable load s | executable MB '
      '| step ms (median, min-max) |'
  )
  print('|---|---:|---:|---:|---:|---|')
  for row, key in ((tree_row, 'tree'), (flat_row, 'flat')):
    t = times[key]
    print(
        f'| {row["name"]} | {row["fusions"]} | {row["compile_s"]:.1f} | {row["load_s"]:.2f} '
        f'| {row["mb"]:.1f} | {statistics.median(t):.0f} ({min(t):.0f}-{max(t):.0f}) |'
    )
  print(
      f'\nflat / tree: compile {flat_row["compile_s"] / tree_row["compile_s"]:.2f}, load '
      f'{flat_row["load_s"] / tree_row["load_s"]:.2f}, step {statistics.median(ratios):.2f} '
      f'(median of {args.rounds} interleaved rounds)'
  )
  print(
      f'losses of the first 3 steps: tree {np.round(losses["tree"], 6).tolist()}, '
      f'flat {np.round(losses["flat"], 6).tolist()}; largest parameter difference after '
      f'{3 + args.rounds * args.steps_per_round} steps: {worst:.2e}'
  )


if __name__ == '__main__':
  main()
