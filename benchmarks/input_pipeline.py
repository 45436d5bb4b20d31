"""Input-pipeline throughput next to what one training step consumes (not a test).

  .venv/bin/python benchmarks/input_pipeline.py [--markdown]

Pipeline: two sources, each through its TFDS builder into a temporary directory and then
`input_pipeline.create_train_iterator` with the default config's augmentation, at 224 px and at
the default image size: FreiHAND-layout files (textured 224 px JPEGs) and the synthetic data
set (rendered at config.data.render_size, PNG). Training: the jitted train step
(`train_step_lib.train_step` with `train_step_lib.make_loss_fn`, forward + backward + AdamW) of the default config
on a batch of that pipeline. Both run on this machine's CPU; the target ratio is >= 5x.
"""

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top
from datasets.freihand import testing  # pylint: disable=g-import-not-at-top
from diffhand_jax import input_pipeline  # pylint: disable=g-import-not-at-top
from diffhand_jax import models  # pylint: disable=g-import-not-at-top
from diffhand_jax import optim  # pylint: disable=g-import-not-at-top
from diffhand_jax import procedural_mano  # pylint: disable=g-import-not-at-top
from diffhand_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top


def pipeline_examples_per_second(config, num_batches):
  """Examples/s of the training stream after two warm-up batches."""
  iterator = input_pipeline.create_train_iterator(config)
  batch = next(iterator)
  next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  elapsed = time.perf_counter() - start
  return num_batches * len(batch['index']) / elapsed, batch


def train_step_examples_per_second(config, batch, num_steps):
  """Examples/s that the jitted train step of `config` consumes (median of num_steps)."""
  model = models.build_model(config)
  params = models.init_params(model, jax.random.PRNGKey(0), jnp.asarray(batch['image'][:1]))
  total_steps = int(config.train.num_steps)
  optimizer = optim.make_optimizer(config.optim, total_steps)
  state = train_step_lib.create_train_state(params, optimizer, jax.random.PRNGKey(1), 0.0)
  loss_fn = train_step_lib.make_loss_fn(
      model, config, procedural_mano.load_hand_model(config).faces
  )
  schedule = optim.learning_rate_schedule(config.optim, total_steps)
  step = jax.jit(
      functools.partial(
          train_step_lib.train_step,
          loss_fn=loss_fn,
          optimizer=optimizer,
          schedule=schedule,
          ema_decay=0.0,
      ),
      donate_argnums=0,
  )
  batch = jax.tree.map(jnp.asarray, batch)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  times = []
  for _ in range(num_steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return len(batch['index']) / float(np.median(times)), compile_seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      '--num_annotations',
      type=int,
      default=64,
      help='unique FreiHAND-layout annotations (x 4 images each)',
  )
  parser.add_argument('--num_batches', type=int, default=10)
  parser.add_argument('--num_steps', type=int, default=3)
  parser.add_argument('--markdown', action='store_true', help='print a BENCHMARKS.md section')
  args = parser.parse_args()

  default = synthetic_config.get_config()
  sizes = sorted({224, int(default.data.image_size)}, reverse=True)
  rows, batches = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    for source in ('freihand', 'synthetic'):
      config = synthetic_config.get_config()
      config.data.tfds_data_dir = os.path.join(tmp, 'tfds')
      if source == 'freihand':
        config.data.name = 'freihand'
        config.data.root = os.path.join(tmp, 'files')
        testing.write_layout(
            config.data.root, args.num_annotations, 2, image_size=224, textured=True
        )
        what = 'FreiHAND layout (textured 224 px JPEG)'
      else:
        config.data.num_train = 4 * args.num_annotations
        config.data.num_eval = 2
        what = f'synthetic ({config.data.render_size} px PNG)'
      with contextlib.redirect_stdout(sys.stderr):  # TFDS progress messages: not the table
        input_pipeline.get_builder(config)  # prepare once, outside the timings
      for size in sizes:
        config.data.image_size = size
        rate, batch = pipeline_examples_per_second(config, args.num_batches)
        batches.setdefault(size, batch)
        rows.append(
            (
                f'train pipeline, {what} -> {size}x{size}, batch '
                f'{config.train.global_batch_size}',
                rate,
            )
        )
  step_rate, compile_seconds = train_step_examples_per_second(
      default, batches[default.data.image_size], args.num_steps
  )
  rows.append(
      (
          f'train step consumes (default config: {default.model.encoder}-'
          f'{default.model.encoder_size}, {default.data.image_size} px, batch '
          f'{default.train.global_batch_size}; compile {compile_seconds:.1f} s)',
          step_rate,
      )
  )
  ratio = min(rate for name, rate in rows if '224x224' in name) / step_rate
  load = os.getloadavg()[0]
  if args.markdown:
    print('## Input pipeline (benchmarks/input_pipeline.py)\n')
    print(
        f'CPU, {os.cpu_count()} cores shared with other jobs (1-min load average {load:.1f} '
        'at the end), jax/tf on CPU; TFDS builders -> `create_train_iterator` with the '
        'default augmentation; the train step is the jitted `train_step_lib.train_step`.\n'
    )
    print('| what | examples/s |\n| --- | --- |')
    for name, rate in rows:
      print(f'| {name} | {rate:.1f} |')
    print(f'| ratio: slowest 224 px pipeline / train step | {ratio:.1f}x (target >= 5x) |')
  else:
    for name, rate in rows:
      print(f'{name:100s} {rate:8.1f} examples/s')
    print(
        f'ratio slowest 224 px pipeline / train step: {ratio:.1f}x (target >= 5x); '
        f'load average {load:.1f}'
    )


if __name__ == '__main__':
  main()
