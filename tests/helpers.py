"""Helpers shared by test modules (no tests here: pytest does not collect this file).

- A tiny stand-in task for the training loop: a two-layer regression, no model, no data
  pipeline (test_train_loop, test_flat_state and the reliability tests).
- The smoke model on 32 x 32 crops, its images and parameters, built once per session on first
  use (test_model, test_sampling).
- `launch`: launch.py in a fresh process (test_train_e2e, test_demo); `tiny_training_script`
  and `start_script`: the tiny task trained in a process a test can signal (reliability).

Nothing runs JAX at import time: pytest imports every test module before it runs any test.
"""

import functools
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from configs import synthetic
from diffhand_jax import train_loop
from diffhand_jax.models import build_model
from diffhand_jax.models import init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- A tiny task for the training loop ----

FEATURES, TARGETS = 6, 3


def tiny_loss(params, batch, keys):
  """Regression from noisy inputs: uses the per-example keys like diffusion."""
  noise = jax.vmap(lambda k: jax.random.normal(k, (FEATURES,)))(keys)
  hidden = jnp.tanh((batch['x'] + 0.1 * noise) @ params['w1'] + params['b1'])
  pred = hidden @ params['w2']
  loss = jnp.mean((pred - batch['y']) ** 2)
  return loss, {'abs_err': jnp.mean(jnp.abs(pred - batch['y']))}


def tiny_init(rng):
  k1, k2 = jax.random.split(rng)
  return {
      'w1': jax.random.normal(k1, (FEATURES, 16)) * 0.5,
      'b1': jnp.zeros((16,)),
      'w2': jax.random.normal(k2, (16, TARGETS)) * 0.5,
  }


def tiny_batch(seed, step, batch_size, nan=False):
  rng = np.random.default_rng([seed, step])
  x = rng.normal(size=(batch_size, FEATURES)).astype(np.float32)
  y = np.sin(x[:, :TARGETS]).astype(np.float32)
  if nan:
    x[0, 0] = np.nan
  return {'x': x, 'y': y}


def tiny_iterator(config, start_step, nan_at=None, sigterm_at=None):
  step = start_step
  while True:
    if sigterm_at is not None and step == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    yield tiny_batch(config.seed, step, config.train.global_batch_size, nan=step == nan_at)
    step += 1


def tiny_config(**train_overrides):
  """The smoke config with 4 steps of batch 8, a checkpoint every 2; `config.train` overrides."""
  config = synthetic.get_config('smoke')
  config.train.num_steps = 4
  config.train.global_batch_size = 8
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.optim.warmup_steps = 1
  config.optim.learning_rate = 0.05
  config.optim.ema_decay = 0.5
  config.train.update(train_overrides)
  return config


def tiny_task(config, **iterator_kwargs):
  """The train_loop.Task of the tiny regression; `iterator_kwargs`: nan_at, sigterm_at."""
  return train_loop.Task(
      init_params=tiny_init,
      loss_fn=tiny_loss,
      train_iterator=lambda start: tiny_iterator(config, start, **iterator_kwargs),
  )


def max_rel_diff(a, b):
  """The largest max|a - b| / max|b| over the leaves of two trees."""
  leaves = jax.tree.leaves(
      jax.tree.map(lambda x, y: np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12), a, b)
  )
  return max(leaves)


# ---- The smoke model ----

SMOKE_IMAGE_SIZE = 32  # the smoke ResNet has stride 16: 2 x 2 = 4 tokens


def smoke_config(decoder='cross_modality', use_diffusion=True, dtype='float32'):
  """The smoke config for SMOKE_IMAGE_SIZE crops with the model switches replaced."""
  config = synthetic.get_config('smoke')
  config.data.image_size = SMOKE_IMAGE_SIZE
  config.decoder = decoder
  config.diffusion = use_diffusion
  config.model.dtype = dtype
  return config


@functools.cache
def smoke_model():
  """build_model(smoke_config()): the diffusion model with the cross-modality decoder."""
  return build_model(smoke_config())


@functools.cache
def smoke_images(batch=2, seed=0):
  """[batch, S, S, 3] standard normal images (S = SMOKE_IMAGE_SIZE)."""
  return jax.random.normal(jax.random.key(seed), (batch, SMOKE_IMAGE_SIZE, SMOKE_IMAGE_SIZE, 3))


@functools.cache
def smoke_params(decoder='cross_modality'):
  """Initial parameters of the smoke model; they depend on neither config.diffusion nor
  config.model.dtype, so every model of `smoke_config(decoder, ...)` shares them."""
  return init_params(build_model(smoke_config(decoder)), jax.random.key(0), smoke_images())


# ---- launch.py in a fresh process ----


def launch(*args, devices=2, timeout=900):
  """Runs launch.py on `devices` fake CPU devices; returns its combined output."""
  env = dict(
      os.environ,
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
      JAX_PLATFORMS='cpu',
      TF_CPP_MIN_LOG_LEVEL='3',
  )
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'), *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-4000:]
  return output


# ---- The tiny task in a process of its own ----

_TINY_TRAINING_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    import helpers
    from diffhand_jax import train_loop

    config = helpers.tiny_config(**{train_overrides!r})
    config.train.num_steps = {num_steps!r}

    def slow(start):  # ~0.1 s a step: signals land in steps and in async saves
      for batch in helpers.tiny_iterator(config, start):
        time.sleep(0.1)
        yield batch

    task = helpers.tiny_task(config)._replace(train_iterator=slow)
    train_loop.run_training(config, sys.argv[1], task)
    print('FINISHED', flush=True)
""")


def tiny_training_script(path, num_steps, **train_overrides):
  """Writes to `path` a script that trains `tiny_config(**train_overrides)` for `num_steps`
  steps (~0.1 s each) in the workdir given as its argument, then prints FINISHED."""
  path.write_text(
      _TINY_TRAINING_SCRIPT.format(
          root=ROOT,
          tests=os.path.join(ROOT, 'tests'),
          num_steps=num_steps,
          train_overrides=train_overrides,
      )
  )
  return path


def start_script(script, workdir):
  """Starts `script workdir` on 4 fake CPU devices; stdout and stderr in one text pipe."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  return subprocess.Popen(
      [sys.executable, '-u', str(script), str(workdir)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
