"""Training-step speed: step time, images/s, model FLOPs, MFU, compile time, peak memory.

For each configuration x compute dtype x remat setting, in one process on one device:
  - the exact DiffHand train step of train.py (`train_step.train_step` with the DESIGN §5
    losses, AdamW, clipping), jitted with the state donated, on a synthetic batch of the
    contract's shapes;
  - compile time: trace + lower, and XLA compile, timed separately;
  - model FLOPs per step from XLA's cost analysis of the lowered (not yet optimised) step: the
    compiled module's analysis leaves out the library calls on a GPU (cuBLAS/cuDNN matmuls and
    convolutions): on an H200 it reported 394 GFLOP for a step of 6,866 (DeiT-Base, batch 64);
  - step time: median (and min-max) over repeats of `--steps` consecutive steps, the host
    waiting only at the end of each repeat (as the train loop does);
  - MFU = FLOPs per step / step time / matmul rate, where the matmul rate is measured in the
    same run on the same device: an N x N x N product in the same dtype (the roofline this
    device reaches on dense matrix work); with --peak_tflops also against that nominal peak;
  - peak memory of the step as XLA plans it (arguments + outputs + temporaries - aliased);
  - with --fit_batch (accelerators): the largest batch that fits, from the planned memory at
    two batch sizes (linear in the batch), checked by compiling and running that batch.

The configurations: 'smoke' (configs/synthetic.py:smoke), 'synthetic' (the CPU default),
'freihand_base' (configs/freihand.py with DeiT-Base, 224 px, batch 64) and 'freihand' (the
paper's DeiT-Large). Imports neither TensorFlow nor the input pipeline (train_step.py), so it
runs where only JAX, Flax, Optax and ml_collections are installed.

Usage:
  .venv/bin/python benchmarks/train_step.py                                  # smoke, synthetic
  .venv/bin/python benchmarks/train_step.py --configs=freihand_base --batch=8 --repeats=2
  python benchmarks/train_step.py --configs=synthetic,freihand_base --dtypes=float32,bfloat16 \
      --remat=false,true --peak_tflops=989 --fit_batch          # on a GPU
  .venv/bin/python benchmarks/train_step.py --configs=synthetic --compilation_cache=/tmp/xla
      # twice: the first compile is cold, the second a cache hit
"""

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import freihand
from configs import synthetic
from diffhand_jax import flat_state
from diffhand_jax import host_memory
from diffhand_jax import mano
from diffhand_jax import models
from diffhand_jax import optim
from diffhand_jax import procedural_mano
from diffhand_jax import step_cache
from diffhand_jax import train_step as train_step_lib


def make_config(name: str, dtype: str, remat: bool, batch: int = 0):
  """The named configuration with the compute dtype, remat and (if > 0) the batch set."""
  if name == 'smoke':
    config = synthetic.get_config('smoke')
  elif name == 'synthetic':
    config = synthetic.get_config()
  elif name in ('freihand', 'freihand_base'):
    config = freihand.get_config()
    config.mano_path = ''  # the procedural hand: same topology, no licence needed
    config.model.pretrained_path = ''
    if name == 'freihand_base':
      config.model.encoder_size = 'base'
  else:
    raise ValueError(f'unknown config {name!r} (smoke, synthetic, freihand_base, freihand)')
  config.model.dtype = dtype
  config.model.remat = remat
  if batch:
    config.train.global_batch_size = batch
  return config


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict:
  """A batch with the contract's keys and shapes: template hand + noise, random images."""
  rng = np.random.default_rng(seed)
  hand = procedural_mano.load_hand_model(config)
  regressor = mano.joint_regressor21(hand, tuple(config.tip_vertex_ids))
  verts = hand.v_template[None] + 0.005 * rng.normal(size=(batch_size, *hand.v_template.shape))
  joints = np.einsum('jv,bvc->bjc', regressor, verts)
  verts, joints = verts - joints[:, :1], joints - joints[:, :1]
  size = int(config.data.image_size)
  batch = {
      'image': rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
      'verts': verts.astype(np.float32),
      'joints3d': joints.astype(np.float32),
      'joints2d': rng.uniform(-1, 1, (batch_size, 21, 2)).astype(np.float32),
      'valid': np.ones((batch_size,), np.float32),
  }
  if config.model.use_depth:
    batch['depth'] = rng.uniform(0, 1, (batch_size, size, size, 1)).astype(np.float32)
  return batch


def abstract_params(model, config):
  """The model's parameter shapes (`jax.ShapeDtypeStruct`s): nothing is allocated."""
  size = int(config.data.image_size)
  depth = jnp.zeros((1, size, size, 1)) if config.model.use_depth else None
  return jax.eval_shape(
      lambda: models.init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), depth)
  )


def step_parts(config, model, params):
  """(step_fn, layout, state in the tree layout) as launch.py trains `config`.

  `params` may be `jax.ShapeDtypeStruct`s (`abstract_params`): the state is then abstract too,
  and the step can be lowered without a weight in memory.
  """
  num_steps = int(config.train.num_steps)  # the config's own schedule
  optimizer = optim.make_optimizer(config.optim, num_steps)
  ema_decay = float(config.optim.ema_decay)
  make_state = lambda p: train_step_lib.create_train_state(
      p, optimizer, jax.random.PRNGKey(1), ema_decay
  )
  abstract = isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)
  state = jax.eval_shape(make_state, params) if abstract else make_state(params)
  loss_fn = train_step_lib.make_loss_fn(
      model, config, procedural_mano.load_hand_model(config).faces
  )
  layout = flat_state.step_layout(config, num_steps, loss_fn, optimizer, state)  # as trained
  step_fn = functools.partial(
      train_step_lib.train_step,
      loss_fn=layout.loss_fn,
      optimizer=layout.optimizer,
      schedule=optim.learning_rate_schedule(config.optim, num_steps),
      ema_decay=ema_decay,
  )
  return step_fn, layout, state


def build_step(config, step_cache_dir: str = ''):
  """(jitted step with the state donated, initial state, batch) for `config`.

  With `step_cache_dir`, the step is a `step_cache.CachedStep` keeping its lowering there
  (what launch.py does beside the compilation cache).
  """
  model = models.build_model(config)
  batch = synthetic_batch(config, int(config.train.global_batch_size))
  size = int(config.data.image_size)
  depth = jnp.zeros((1, size, size, 1)) if config.model.use_depth else None
  params = jax.jit(
      lambda rng: models.init_params(model, rng, jnp.zeros((1, size, size, 3)), depth)
  )(jax.random.PRNGKey(0))
  step_fn, layout, state = step_parts(config, model, params)
  state = layout.to_step(state)
  if step_cache_dir:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step = step_cache.CachedStep(
        step_fn, device, device, key=step_cache.config_key(config), cache_dir=step_cache_dir
    )
  else:
    step = jax.jit(step_fn, donate_argnums=(0,))
  batch = jax.device_put(batch)
  return step, state, batch


def cost_flops(stage) -> float:
  """FLOPs of a lowered or compiled computation from XLA's cost analysis (0 if unavailable)."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


def planned_peak_bytes(compiled) -> int:
  """Arguments + outputs + temporaries - aliased (donated) bytes, as XLA planned them."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  return int(
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
  )


def matmul_rate(dtype: str, size: int, repeats: int = 10) -> float:
  """Measured FLOP/s of an N x N x N matrix product in `dtype` on the default device."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32).astype(dtype)
  product = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(product(a, b))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(product(a, b))
    times.append(time.perf_counter() - start)
  return 2.0 * size**3 / float(np.median(times))


def time_steps(step, state, batch, steps: int, repeats: int):
  """Median and (min, max) seconds per step over `repeats` runs of `steps` steps."""
  state, metrics = step(state, batch)  # warm-up (already compiled)
  jax.block_until_ready(metrics)
  per_step = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready((state.params, metrics))
    per_step.append((time.perf_counter() - start) / steps)
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'the benchmarked step gave a non-finite loss ({loss})')
  return float(np.median(per_step)), (min(per_step), max(per_step)), state


def measure(name, dtype, remat, args, roofline):
  config = make_config(name, dtype, remat, args.batch)
  batch_size = int(config.train.global_batch_size)
  step, state, batch = build_step(config)
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops = cost_flops(lowered)
  peak = planned_peak_bytes(compiled)
  seconds, (low, high), state = time_steps(step, state, batch, args.steps, args.repeats)
  row = dict(
      config=name,
      dtype=dtype,
      remat=remat,
      batch=batch_size,
      step_ms=1e3 * seconds,
      step_ms_min=1e3 * low,
      step_ms_max=1e3 * high,
      images_per_s=batch_size / seconds,
      lower_s=lower_s,
      compile_s=compile_s,
      gflop_per_step=flops / 1e9,
      achieved_tflops=flops / seconds / 1e12,
      mfu_vs_matmul=flops / seconds / roofline[dtype],
      planned_peak_gib=peak / 2**30,
  )
  if args.peak_tflops:
    row['mfu_vs_peak'] = flops / seconds / (args.peak_tflops * 1e12)
  if args.fit_batch:
    row['largest_batch'] = largest_batch(name, dtype, remat, batch_size, peak)
  del state
  return row


def device_memory_bytes() -> int:
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get('bytes_limit', 0))


def largest_batch(name, dtype, remat, batch_size, peak) -> int:
  """The largest batch whose step fits in device memory: planned peak memory is linear in the
  batch (fitted from `batch_size` and 2 x `batch_size`), then that batch is compiled and run."""
  limit = device_memory_bytes()
  if not limit:
    return 0

  def planned(batch):
    step, state, data = build_step(make_config(name, dtype, remat, batch))
    return planned_peak_bytes(step.lower(state, data).compile())

  per_example = (planned(2 * batch_size) - peak) / batch_size
  fixed = peak - per_example * batch_size
  guess = int((0.95 * limit - fixed) // per_example)
  guess -= guess % 8
  while guess > batch_size:
    try:
      step, state, data = build_step(make_config(name, dtype, remat, guess))
      state, metrics = step(state, data)
      jax.block_until_ready(metrics)
      return guess
    except Exception as error:  # pylint: disable=broad-except
      if 'RESOURCE_EXHAUSTED' not in str(error) and 'out of memory' not in str(error).lower():
        raise
      guess = int(guess * 0.9) - int(guess * 0.9) % 8
  return batch_size


def print_table(rows, machine):
  columns = (
      'config', 'dtype', 'remat', 'batch', 'step ms (min-max)', 'images/s',
      'compile s (lower + XLA)', 'GFLOP/step', 'TFLOP/s', 'MFU vs matmul', 'MFU vs peak',
      'planned peak GiB', 'largest batch',
  )  # fmt: skip
  print(f'\n{machine}\n')
  print('| ' + ' | '.join(columns) + ' |')
  print('|' + '---|' * len(columns))
  for r in rows:
    cells = (
        r['config'],
        r['dtype'],
        r['remat'],
        r['batch'],
        f"{r['step_ms']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f})",
        f"{r['images_per_s']:.1f}",
        f"{r['lower_s']:.1f} + {r['compile_s']:.1f}",
        f"{r['gflop_per_step']:.1f}",
        f"{r['achieved_tflops']:.3f}",
        f"{100 * r['mfu_vs_matmul']:.1f}%",
        f"{100 * r['mfu_vs_peak']:.1f}%" if 'mfu_vs_peak' in r else '-',
        f"{r['planned_peak_gib']:.2f}",
        r.get('largest_batch', '-'),
    )
    print('| ' + ' | '.join(str(c) for c in cells) + ' |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='smoke,synthetic')
  parser.add_argument('--dtypes', default='float32')
  parser.add_argument('--remat', default='false', help='comma list of true/false')
  parser.add_argument('--batch', type=int, default=0, help='override every batch (0: config)')
  parser.add_argument('--steps', type=int, default=5, help='steps per timed repeat')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--matmul_size', type=int, default=0, help='0: 8192 on GPU, 2048 on CPU')
  parser.add_argument('--peak_tflops', type=float, default=0.0, help='nominal device peak')
  parser.add_argument('--fit_batch', action='store_true', help='find the largest batch')
  parser.add_argument('--json', default='', help='also write the rows here')
  parser.add_argument(
      '--compilation_cache',
      default='',
      help="JAX's persistent compilation cache folder: run twice to time a cold and a warm "
      '(cache hit) compile',
  )
  args = parser.parse_args()
  if args.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', args.compilation_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

  device = jax.devices()[0]
  dtypes = args.dtypes.split(',')
  size = args.matmul_size or (8192 if device.platform == 'gpu' else 2048)
  roofline = {dtype: matmul_rate(dtype, size) for dtype in dtypes}
  machine = (
      f'device {device.device_kind} ({device.platform}), host {platform.machine()} with '
      f'{os.cpu_count()} CPUs, jax {jax.__version__}; matmul roofline at N={size}: '
      + ', '.join(f'{d} {r / 1e12:.2f} TFLOP/s' for d, r in roofline.items())
  )
  print(machine, flush=True)
  rows = []
  for name in args.configs.split(','):
    for dtype in dtypes:
      for remat in (value.strip().lower() == 'true' for value in args.remat.split(',')):
        rows.append(measure(name, dtype, remat, args, roofline))
        print(json.dumps(rows[-1]), flush=True)
  print_table(rows, machine)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(machine=machine, rows=rows), f, indent=2)


if __name__ == '__main__':
  host_memory.reexec_with_huge_pages()
  main()
