"""The measurements behind benchmarks/gpu_table.py, one piece per process.

Each piece writes its rows to a JSON file (`--result`) as soon as it has them, so that a piece
stopped at its time limit still leaves what it measured. The pieces:

  matmul   the bf16 matmul rate of this device (an N x N x N product, N = 8192 on a GPU): the
           roofline the train rows' MFU is measured against, in the same run;
  train    the full DiffHand train step (`train_step.build_step`: DESIGN §5 losses, AdamW,
           clipping, EMA) of configs/freihand.py with DeiT-Base or DeiT-Large, bfloat16,
           224 px, batch 64: ms/step, images/s, model FLOPs (XLA's cost analysis of the lowered
           step), MFU; XLA's planned memory without and with remat; the largest batch that
           fits (planned memory is linear in the batch: fitted from batch B and 2B, both
           lowered with abstract shapes and compiled side by side, then run when time allows);
  sample   `sampling.sample` (S = 10 DDIM steps) for K = 1 and K = 16 hypotheses of one image;
  torch    the same network in PyTorch (benchmarks/torch_reference.py: its L2 loss + Adam),
           eager or torch.compile, under bfloat16 autocast.

Every JAX piece runs the standard JAX path: config.model.cpu_kernels is off on any backend
other than the CPU. With --toy every model is a ViT-micro at 32 px, batch 2 (a CPU check of the
plumbing, not a measurement).

Usage (one piece; gpu_table.py runs them all):
  python benchmarks/gpu_pieces.py --piece=train --model=base --result=/tmp/train_base.json
"""

import argparse
import concurrent.futures
import functools
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import sampling as sampling_bench
from benchmarks import train_step
from configs import freihand
from diffhand_jax import models
from diffhand_jax import sampling

DTYPE = 'bfloat16'
SAMPLING_STEPS = 10
HYPOTHESES = (1, 16)
TOY_IMAGE_SIZE = 32
TOY_BATCH = 2
# Headroom under the device's memory limit when fitting the largest batch (as train_step.py).
MEMORY_HEADROOM = 0.95


class Rows:
  """The piece's rows {key: {field: value}} and `meta`, rewritten to `path` on every update
  (each update also printed, with the seconds since the piece began, to its log)."""

  def __init__(self, path: str):
    self.path = path
    self.data = {'rows': {}, 'meta': {}}
    self.start = time.time()

  def update(self, key: str, **fields) -> None:
    print(f'[{time.time() - self.start:6.1f} s] {key}: {fields}', flush=True)
    self.data['rows'].setdefault(key, {}).update(fields)
    self.save()

  def meta(self, **fields) -> None:
    self.data['meta'].update(fields)
    self.save()

  def save(self) -> None:
    tmp = f'{self.path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
      json.dump(self.data, f, indent=1)
    os.replace(tmp, self.path)


def machine_meta() -> dict:
  """The device, host and library versions of this process."""
  device = jax.devices()[0]
  return dict(
      device=f'{device.device_kind} ({device.platform})',
      host=f'{platform.machine()}, {os.cpu_count()} CPUs',
      jax=jax.__version__,
  )


def bench_config(model: str, toy: bool):
  """configs/freihand.py with DeiT-`model` ('base' | 'large') in bfloat16, the standard JAX path.

  With `toy`, the paper config's smoke variant with a ViT-micro encoder at 32 px, batch 2.
  """
  if toy:
    config = freihand.get_config('smoke')
    config.mano_path = ''
    config.model.pretrained_path = ''
    config.model.encoder = 'deit'
    config.model.encoder_size = 'micro'
    config.data.image_size = TOY_IMAGE_SIZE
    config.model.dtype = DTYPE
    config.model.remat = False
    config.train.global_batch_size = TOY_BATCH
  else:
    name = {'base': 'freihand_base', 'large': 'freihand'}[model]
    config = train_step.make_config(name, DTYPE, remat=False)
  if jax.default_backend() != 'cpu' and 'cpu_kernels' in config.model:
    config.model.cpu_kernels = False  # accelerators measure the standard JAX path
  return config


def with_changes(config, batch: int = 0, remat=None):
  """A copy of `config` with another batch and/or remat setting."""
  config = config.copy_and_resolve_references()
  if batch:
    config.train.global_batch_size = batch
  if remat is not None:
    config.model.remat = remat
  return config


# ---- matmul ----


def matmul_size(toy: bool) -> int:
  if toy:
    return 256
  return 2048 if jax.default_backend() == 'cpu' else 8192


def run_matmul(args, rows: Rows) -> None:
  """The bf16 matmul roofline row."""
  size = matmul_size(args.toy)
  rows.update('matmul', status='running', batch=size)
  rate = train_step.matmul_rate(DTYPE, size)
  rows.update(
      'matmul',
      status='ok',
      ms=1e3 * 2.0 * size**3 / rate,
      tflops=rate / 1e12,
      mfu_peak=rate / (args.peak_tflops * 1e12),
  )


def roofline_rate(args) -> float:
  """The matmul rate of the matmul piece (same run), else measured here."""
  if args.matmul_json and os.path.exists(args.matmul_json):
    with open(args.matmul_json) as f:
      row = json.load(f)['rows'].get('matmul', {})
    if row.get('status') == 'ok':
      return float(row['tflops']) * 1e12
  return train_step.matmul_rate(DTYPE, matmul_size(args.toy))


# ---- train ----


def abstract_step(config):
  """The lowered train step of `config` from abstract shapes: no weight is allocated."""
  model = models.build_model(config)
  step_fn, layout, state = train_step.step_parts(
      config, model, train_step.abstract_params(model, config)
  )
  batch = train_step.synthetic_batch(config, int(config.train.global_batch_size))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  return jax.jit(step_fn, donate_argnums=(0,)).lower(jax.eval_shape(layout.to_step, state), batch)


def compile_options() -> dict:
  """XLA options for compiles that only plan memory: no GEMM autotuning on a GPU (faster)."""
  return {'xla_gpu_autotune_level': 0} if jax.default_backend() == 'gpu' else {}


def compile_for_memory(lowered):
  """`lowered` compiled with `compile_options` (without them where XLA refuses them)."""
  options = compile_options()
  try:
    return lowered.compile(compiler_options=options)
  except Exception:  # pylint: disable=broad-except
    if not options:
      raise
    return lowered.compile()


def timed_compile(lowered):
  """(compiled, seconds) of `lowered` with the default options: the step that is timed."""
  start = time.perf_counter()
  compiled = lowered.compile()
  return compiled, time.perf_counter() - start


def memory_limit(args) -> int:
  """Bytes the largest batch must fit in: --memory_limit_gib, else the device's limit (0: none)."""
  if args.memory_limit_gib:
    return int(args.memory_limit_gib * 2**30)
  return train_step.device_memory_bytes()


def round_batch(batch: int) -> int:
  """`batch` rounded down to a multiple of 8 from 16 up; at least 0."""
  return batch - batch % 8 if batch >= 16 else max(batch, 0)


def fitted_batch(peak: int, double_peak: int, batch: int, limit: int) -> int:
  """The largest batch under MEMORY_HEADROOM x `limit`, planned memory being linear in the
  batch through (batch, peak) and (2 batch, double_peak)."""
  per_example = max(double_peak - peak, 1) / batch
  fixed = peak - per_example * batch
  return round_batch(int((MEMORY_HEADROOM * limit - fixed) // per_example))


def is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def run_fit(config, guess: int, compile_s: float, deadline: float):
  """(batch, 'ran' | 'planned'): runs one step at `guess` (90 % of it after an out-of-memory
  error) while the deadline leaves time for a compile; what is left unrun stays 'planned'.
  A guess at or below the config's batch gives that batch, which has run."""
  batch = int(config.train.global_batch_size)
  if guess <= batch:
    return batch, 'ran'
  while guess > batch and time.time() + 1.5 * compile_s + 10 < deadline:
    try:
      step, state, data = train_step.build_step(with_changes(config, batch=guess))
      state, metrics = step(state, data)
      jax.block_until_ready(metrics)
      return guess, 'ran'
    except Exception as error:  # pylint: disable=broad-except
      if not is_out_of_memory(error):
        raise
      guess = min(round_batch(9 * guess // 10), guess - 1)
  return (batch, 'ran') if guess <= batch else (guess, 'planned')


def start_memory_plans(pool, config) -> dict:
  """{variant: future of its compiled step} for 'remat' (remat on) and 'double' (twice the
  batch), lowered from abstract shapes and compiled in `pool` (the host's cores, not the GPU)."""
  batch = int(config.train.global_batch_size)
  variants = {
      'remat': with_changes(config, remat=True),
      'double': with_changes(config, batch=2 * batch),
  }
  return {name: pool.submit(compile_for_memory, abstract_step(c)) for name, c in variants.items()}


def time_compiled(compiled, state, data, args, flops: float, roofline: float) -> dict:
  """The timing fields of a train row: `args.repeats` x `args.steps` steps of `compiled`."""
  seconds, (low, high), _ = train_step.time_steps(compiled, state, data, args.steps, args.repeats)
  batch = int(jax.tree.leaves(data)[0].shape[0])
  return dict(
      ms=1e3 * seconds,
      ms_min=1e3 * low,
      ms_max=1e3 * high,
      images_per_s=batch / seconds,
      tflops=flops / seconds / 1e12,
      mfu_matmul=flops / seconds / roofline,
      mfu_peak=flops / seconds / (args.peak_tflops * 1e12),
  )


def run_train(args, rows: Rows) -> None:
  """The train-step row of DeiT-`args.model`: compile (the memory plans alongside), time, then
  the largest batch."""
  key = f'train_{args.model}'
  config = bench_config(args.model, args.toy)
  batch = int(config.train.global_batch_size)
  rows.update(key, status='running: compile', batch=batch)
  roofline = roofline_rate(args)
  step, state, data = train_step.build_step(config)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    start = time.perf_counter()
    lowered = step.lower(state, data)
    lower_s = time.perf_counter() - start
    main = pool.submit(timed_compile, lowered)
    plans = start_memory_plans(pool, config)  # traced while the timed step compiles
    compiled, compile_s = main.result()
    flops, peak = train_step.cost_flops(lowered), train_step.planned_peak_bytes(compiled)
    rows.update(
        key,
        status='running: time',
        first_s=f'{lower_s:.1f} + {compile_s:.1f}',
        gflop_per_step=flops / 1e9,
        memory_gib=peak / 2**30,
    )
    fields = time_compiled(compiled, state, data, args, flops, roofline)
    rows.update(key, status='running: plan memory', **fields)
    del step, compiled, state, data
    planned = {name: train_step.planned_peak_bytes(p.result()) for name, p in plans.items()}
  rows.update(key, memory_remat_gib=planned['remat'] / 2**30)
  limit = memory_limit(args)
  rows.meta(memory_limit_gib=limit / 2**30)
  if not limit:
    rows.update(key, status='ok', largest_batch='n/a (no memory limit)')
    return
  guess = fitted_batch(peak, planned['double'], batch, limit)
  guess = min(guess, args.max_fit_batch) if args.max_fit_batch else guess
  rows.update(key, status='running: run the largest batch', largest_batch=f'{guess} (planned)')
  fit, how = run_fit(config, guess, compile_s, args.deadline)
  rows.update(key, status='ok', largest_batch=f'{fit} ({how})')


# ---- sample ----


def run_sample(args, rows: Rows) -> None:
  """`sampling.sample` rows, S = 10, K = 1 and 16, one image, random weights."""
  config = bench_config(args.model, args.toy)
  model = models.build_model(config)
  size = int(config.data.image_size)
  images = jax.random.normal(jax.random.key(0), (1, size, size, 3))
  params = jax.jit(lambda key: models.init_params(model, key, images))(jax.random.key(1))
  sample = jax.jit(sampling.sample, static_argnames=sampling_bench.STATIC)
  for k in HYPOTHESES:
    key = f'sample_{args.model}_k{k}'
    rows.update(key, status='running', batch=1)
    call = functools.partial(
        sample, model, params, images, jax.random.key(2), num_sampling_steps=SAMPLING_STEPS,
        num_hypotheses=k,
    )  # fmt: skip
    (first,), (times,) = sampling_bench.call_times([call], args.repeats)
    rows.update(key, status='ok', first_s=f'{first:.1f}', **time_fields(times, 1))


def time_fields(times, batch: int) -> dict:
  """ms (median, min, max) and images/s of per-call seconds `times` at `batch`."""
  median = float(np.median(times))
  return dict(
      ms=1e3 * median,
      ms_min=1e3 * float(np.min(times)),
      ms_max=1e3 * float(np.max(times)),
      images_per_s=batch / median,
  )


# ---- torch ----


def run_torch(args, rows: Rows) -> None:
  """The PyTorch twin's train step (torch_reference.py), eager or torch.compile'd."""
  key = f'torch_{args.framework}_{args.model}'
  try:
    import torch
    from benchmarks import torch_reference
  except ImportError:
    rows.update(key, status='not installed')
    return
  config = bench_config(args.model, args.toy)
  batch = int(config.train.global_batch_size)
  rows.update(key, status='running', batch=batch)
  options = argparse.Namespace(
      repeats=args.repeats,
      frameworks=args.framework,
      compile_mode='default',
      skip_sampling=True,
      freihand_batch=0,
      dtype=DTYPE,
  )
  torch_device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  rows.meta(torch=f'{torch.__version__} on {torch_device}')
  summary = torch_reference.benchmark_config(
      f'deit_{args.model}', options, jax.devices()[0], torch_device, config=config
  )
  result = summary['results']['train'][args.framework]
  if isinstance(result, str):  # the failure's message
    rows.update(key, status=result)
    return
  first, times = result
  rows.update(key, status='ok', first_s=f'{first:.1f}', **time_fields(times, summary['batch']))


PIECES = {'matmul': run_matmul, 'train': run_train, 'sample': run_sample, 'torch': run_torch}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--piece', required=True, choices=sorted(PIECES))
  parser.add_argument('--model', default='base', choices=('base', 'large'))
  parser.add_argument('--framework', default='eager', choices=('eager', 'compile'))
  parser.add_argument('--result', required=True, help='the JSON file of the rows')
  parser.add_argument('--toy', action='store_true', help='ViT-micro, 32 px, batch 2 (CPU)')
  parser.add_argument('--steps', type=int, default=10, help='train steps per timed repeat')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--peak_tflops', type=float, default=989.0, help='nominal bf16 peak')
  parser.add_argument('--matmul_json', default='', help="the matmul piece's result file")
  parser.add_argument(
      '--memory_limit_gib', type=float, default=0.0, help="0: the device's own limit"
  )
  parser.add_argument(
      '--max_fit_batch', type=int, default=0, help='cap the largest batch searched (0: none)'
  )
  parser.add_argument(
      '--deadline', type=float, default=float('inf'), help='unix time this piece is stopped at'
  )
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  rows = Rows(args.result)
  rows.meta(**machine_meta())
  PIECES[args.piece](args, rows)


if __name__ == '__main__':
  main()
