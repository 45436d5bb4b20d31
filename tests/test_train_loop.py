"""The training machinery on a tiny stand-in task (no model, no data pipeline).

jit vs pmap vs one device, resume bit-exactness, SIGTERM, the NaN guard and the
learning-rate schedule.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax import checkpointing
from diffhand_jax import optim
from diffhand_jax import parallel
from diffhand_jax import train
from diffhand_jax import train_step as train_step_lib
from helpers import max_rel_diff
from helpers import tiny_batch
from helpers import tiny_config
from helpers import tiny_init
from helpers import tiny_loss
from helpers import tiny_task


def run_steps(parallelism, devices, num_steps=3):
  """num_steps updates through parallel.data_parallel; returns (losses, params)."""
  config = tiny_config()
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  schedule = optim.learning_rate_schedule(config.optim, config.train.num_steps)
  state = train_step_lib.create_train_state(
      tiny_init(jax.random.PRNGKey(1)), optimizer, jax.random.PRNGKey(2), 0.5
  )
  runner = parallel.data_parallel(
      lambda s, b, axis_name: train_step_lib.train_step(
          s,
          b,
          loss_fn=tiny_loss,
          optimizer=optimizer,
          schedule=schedule,
          ema_decay=0.5,
          axis_name=axis_name,
      ),
      parallelism,
      devices,
  )
  placed = runner.put_state(state)
  losses = []
  for step in range(num_steps):
    placed, metrics = runner.step(placed, runner.put_batch(tiny_batch(0, step, 8)))
    losses.append(float(metrics['loss']))
  return np.array(losses), jax.device_get(runner.get_state(placed))


def test_jit_pmap_and_one_device_agree():
  assert jax.device_count() == 4
  one_losses, one_state = run_steps('jit', jax.devices()[:1])
  jit_losses, jit_state = run_steps('jit', None)
  pmap_losses, pmap_state = run_steps('pmap', None)
  for losses, state in ((jit_losses, jit_state), (pmap_losses, pmap_state)):
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
    assert max_rel_diff(state.params, one_state.params) < 1e-5
    assert max_rel_diff(state.ema_params, one_state.ema_params) < 1e-5
    assert int(state.step) == 3
  # The runs did move: the check above is not comparing initial values.
  assert max_rel_diff(one_state.params, tiny_init(jax.random.PRNGKey(1))) > 1e-3
  print(
      'max rel diff jit/1dev',
      max_rel_diff(jit_state.params, one_state.params),
      'pmap/1dev',
      max_rel_diff(pmap_state.params, one_state.params),
  )


def test_example_keys_depend_only_on_global_index():
  step_key = jax.random.PRNGKey(3)
  whole = train_step_lib.example_keys(step_key, 0, 8)
  second_half = train_step_lib.example_keys(step_key, 4, 4)
  np.testing.assert_array_equal(whole[4:], second_half)
  assert len({tuple(k) for k in np.asarray(whole)}) == 8


def test_resume_is_bit_exact_and_sigterm_saves(tmp_path):
  config = tiny_config()
  straight = train.run_training(config, str(tmp_path / 'straight'), tiny_task(config))
  # SIGTERM arrives while step 1 runs: the loop saves step 2 and returns.
  workdir = str(tmp_path / 'resumed')
  stopped = train.run_training(config, workdir, tiny_task(config, sigterm_at=1))
  assert int(stopped.step) == 2
  assert checkpointing.latest_step(workdir) == 2
  resumed = train.run_training(config, workdir, tiny_task(config))
  assert int(resumed.step) == 4
  for a, b in zip(
      jax.tree.leaves(jax.device_get(straight)), jax.tree.leaves(jax.device_get(resumed))
  ):
    np.testing.assert_array_equal(a, b)
  # restore_params returns the EMA params of the last checkpoint.
  params = checkpointing.restore_params(workdir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(resumed.ema_params))):
    np.testing.assert_array_equal(a, b)


def test_resume_pmap_is_bit_exact(tmp_path):
  config = tiny_config(parallelism='pmap', checkpoint_every=2)
  config.train.num_steps = 3
  straight = train.run_training(config, str(tmp_path / 'a'), tiny_task(config))
  config_short = tiny_config(parallelism='pmap')
  config_short.train.num_steps = 3
  workdir = str(tmp_path / 'b')
  train.run_training(config_short, workdir, tiny_task(config_short, sigterm_at=0))
  assert checkpointing.latest_step(workdir) == 1
  resumed = train.run_training(config_short, workdir, tiny_task(config_short))
  for a, b in zip(
      jax.tree.leaves(jax.device_get(straight)), jax.tree.leaves(jax.device_get(resumed))
  ):
    np.testing.assert_array_equal(a, b)


def test_nan_stops_naming_the_step_and_keeps_last_good(tmp_path):
  config = tiny_config()
  config.train.num_steps = 6
  workdir = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match=r'train step 3 .*checkpoint: step 2'):
    train.run_training(config, workdir, tiny_task(config, nan_at=3))
  assert checkpointing.latest_step(workdir) == 2
  params = checkpointing.restore_params(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_huge_learning_rate_is_caught(tmp_path):
  # Step 0 has a finite loss and gradients but overflows the params: that
  # state must not be saved although checkpoint_every = 1.
  config = tiny_config(checkpoint_every=1)
  config.optim.warmup_steps = 0
  config.optim.learning_rate = 1e38
  config.optim.grad_clip_norm = 0.0
  with pytest.raises(FloatingPointError, match='non-finite param_norm .* train step 0'):
    train.run_training(config, str(tmp_path / 'lr'), tiny_task(config))
  assert checkpointing.latest_step(str(tmp_path / 'lr')) is None


def test_learning_rate_schedule_closed_form():
  config = tiny_config()
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 10
  total = 50
  schedule = optim.learning_rate_schedule(config.optim, total)
  for step in range(total + 1):
    if step < 10:
      expected = 1e-3 * step / 10
    else:
      expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 40))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9)
  with pytest.raises(ValueError, match='warmup_steps'):
    config.optim.warmup_steps = 50
    optim.learning_rate_schedule(config.optim, total)


def test_weight_decay_skips_biases():
  config = tiny_config()
  config.optim.learning_rate = 1.0
  config.optim.warmup_steps = 0
  config.optim.weight_decay = 0.5
  config.optim.grad_clip_norm = 0.0
  optimizer = optim.make_optimizer(config.optim, 10)
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  # zero gradients: only decoupled weight decay moves params: -lr * wd * p.
  np.testing.assert_allclose(updates['kernel'], -0.5 * np.ones((2, 2)))
  np.testing.assert_allclose(updates['bias'], np.zeros(2))


def test_bad_parallelism_and_batch_raise():
  with pytest.raises(ValueError, match='parallelism'):
    parallel.data_parallel(lambda s, b, axis_name: (s, {}), 'pjit')
  with pytest.raises(ValueError, match='divisible'):
    parallel.pmap_batch({'x': np.zeros((6, 2))}, 4)


def test_init_from_loads_known_params_and_keeps_new_ones(tmp_path):
  config = tiny_config()
  base_dir = str(tmp_path / 'base')
  base = train.run_training(config, base_dir, tiny_task(config))
  fresh = tiny_init(jax.random.PRNGKey(9))
  fresh['depth_conv'] = jnp.zeros((3, 3))  # a branch the base run lacks
  merged = checkpointing.load_params_into(fresh, base_dir)
  # EMA params of the base (restore_params prefers them), the new branch kept.
  for key in ('w1', 'b1', 'w2'):
    np.testing.assert_array_equal(merged[key], base.ema_params[key])
  np.testing.assert_array_equal(merged['depth_conv'], np.zeros((3, 3)))
  fresh['w2'] = jnp.zeros((2, 2))
  with pytest.raises(ValueError, match='w2 has shape'):
    checkpointing.load_params_into(fresh, base_dir)

  # An adapter may carry a leaf to the wanted shape; what it declines is still an error.
  def adapt(path, loaded, shape):
    return np.resize(loaded, shape) if path == ('w2',) else None

  carried = checkpointing.load_params_into(fresh, base_dir, adapt=adapt)
  np.testing.assert_array_equal(carried['w2'], np.resize(base.ema_params['w2'], (2, 2)))
  with pytest.raises(ValueError, match='w2 has shape'):
    checkpointing.load_params_into(fresh, base_dir, adapt=lambda path, loaded, shape: None)
  # A run with init_from starts from those params.
  config.init_from = base_dir
  config.train.num_steps = 1
  config.optim.learning_rate = 0.0
  config.optim.warmup_steps = 0
  config.optim.weight_decay = 0.0
  started = train.run_training(config, str(tmp_path / 'ft'), tiny_task(config))
  for key in ('w1', 'b1', 'w2'):
    np.testing.assert_allclose(started.params[key], base.ema_params[key], rtol=1e-6, atol=1e-7)


def test_restore_params_without_checkpoint_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    checkpointing.restore_params(str(tmp_path / 'empty'))


@pytest.mark.parametrize('parallelism', parallel.PARALLELISMS)
def test_put_state_never_aliases_the_callers_arrays(parallelism):
  """The step donates the placed state; the caller's arrays must survive."""
  runner = parallel.data_parallel(
      lambda s, b, axis_name: (jax.tree.map(lambda x: x + 1, s), {}), parallelism
  )
  state = {'w': jnp.ones((3,)), 'v': jnp.zeros((2, 2))}
  runner.step(runner.put_state(state), runner.put_batch({'x': np.zeros((4, 1))}))
  np.testing.assert_array_equal(state['w'], np.ones(3))  # not deleted


def test_keeps_latest_and_best_checkpoints(tmp_path):
  config = tiny_config(checkpoint_every=1, eval_every=1, keep_checkpoints=2, best_metric='err')
  config.train.num_steps = 6
  scores = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.0, 6: 6.0}  # best: step 2
  task = tiny_task(config)._replace(evaluate=lambda params, step: {'err': scores[step]})
  workdir = str(tmp_path / 'best')
  train.run_training(config, workdir, task)
  kept = sorted(int(d) for d in os.listdir(checkpointing.checkpoint_dir(workdir)) if d.isdigit())
  assert kept == [2, 5, 6]  # the best and the 2 latest


def test_unknown_best_metric_raises(tmp_path):
  config = tiny_config(best_metric='nope', eval_every=2)
  task = tiny_task(config)._replace(evaluate=lambda params, step: {'err': 1.0})
  with pytest.raises(ValueError, match="best_metric='nope'"):
    train.run_training(config, str(tmp_path / 'x'), task)
