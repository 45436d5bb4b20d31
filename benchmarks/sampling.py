"""Sampling cost: encoder, one decoder step, and `sampling.sample` for S steps, K hypotheses.

DESIGN.md §1 says sampling costs encoder + S x decoder (the encoder runs once per image, the
DDIM loop is a `lax.scan`). This prints, per model and batch B, the median wall time of
  - the whole jitted `sample` for every (S, K) of the grid,
  - the encoder, and one decoder step at batch B*K (the decoder sees B*K rows), timed in
    the same rounds as that `sample` (interleaved: the machine may be shared),
  - ratio = sample / (encoder + S x decoder step)      (target <= 1.1),
and the compile time (lower + compile) of `sample` for S = 10 and S = 50 (target within 20%).
Random weights (timing only). The markdown tables are printed and, with --append, appended
to BENCHMARKS.md.

Usage:
  python benchmarks/sampling.py                        # configs/synthetic.py as is
  python benchmarks/sampling.py --models=default,deit_base --append
  python benchmarks/sampling.py --steps=1,10 --hypotheses=1,4 --repeats=2   # a small grid
  python benchmarks/sampling.py --steps=10 --hypotheses=1,16 --batches=1,64   # throughput
"""

import argparse
import datetime
import functools
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import synthetic
from diffhand_jax import host_memory
from diffhand_jax import sampling
from diffhand_jax.models import build_model
from diffhand_jax.models import init_params

STATIC = ('model', 'num_sampling_steps', 'num_hypotheses', 'aggregate')


def model_config(name):
  """'default' = configs/synthetic.py as is; 'deit_base' = DeiT-Base at 224 x 224."""
  config = synthetic.get_config()
  if name == 'deit_base':
    config.model.encoder = 'deit'
    config.model.encoder_size = 'base'
    config.data.image_size = 224
  elif name != 'default':
    raise ValueError(f'unknown model {name!r} (known: default, deit_base)')
  return config


def call_times(fns, repeats):
  """(first-call seconds, per-call seconds) of each fn(), `repeats` calls after the first.

  The first call of each (compilation included) comes first; then the calls are interleaved
  round by round, so that load from other processes on a shared machine affects all of them
  alike.
  """
  first = []
  for fn in fns:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first.append(time.perf_counter() - start)
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, fn_times in zip(fns, times):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      fn_times.append(time.perf_counter() - start)
  return first, times


def median_times(fns, repeats):
  """Median wall times (s) of each fn() after one warm-up call each (`call_times`)."""
  return [float(np.median(t)) for t in call_times(fns, repeats)[1]]


def compile_time(model, params, images, num_sampling_steps):
  """Seconds to trace, lower and compile `sample` (a fresh jit, so nothing is cached)."""
  fn = jax.jit(functools.partial(sampling.sample, model, num_sampling_steps=num_sampling_steps))
  start = time.perf_counter()
  fn.lower(params, images, jax.random.key(0)).compile()
  return time.perf_counter() - start


def benchmark(name, steps, hypotheses, repeats, batch=1, with_compile=True):
  """Returns the markdown lines for one model at batch `batch`."""
  config = model_config(name)
  model = build_model(config)
  size = config.data.image_size
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  params = init_params(model, jax.random.key(1), images[:1])
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  variables = {'params': params}

  encode = jax.jit(lambda p, im: model.apply(p, im, method='encode'))
  denoise = jax.jit(lambda p, *a: model.apply(p, *a, method='denoise'))
  sample = jax.jit(sampling.sample, static_argnames=STATIC)
  tokens, embedding = encode(variables, images)
  encode_fn = functools.partial(encode, variables, images)

  def denoise_fn(k):
    args = (
        jnp.zeros((batch * k, model.num_points, 3)),
        jnp.full((batch * k,), 500, jnp.int32),
        jnp.repeat(tokens, k, 0),
        jnp.repeat(embedding, k, 0),
    )
    return functools.partial(denoise, variables, *args)

  lines = [
      f'### {name}: {config.model.encoder}-{config.model.encoder_size} {size}x{size}, '
      f'decoder {config.decoder} width {config.model.width}, '
      f'{num_params / 1e6:.1f} M params, batch {batch}',
      '',
      '| S | K | sample ms | ms per image | images/s | encoder ms | decoder step ms (batch '
      'B*K) | encoder + S x decoder ms | ratio |',
      '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for s in steps:
    for k in hypotheses:
      sample_fn = functools.partial(
          sample, model, params, images, jax.random.key(2), num_sampling_steps=s, num_hypotheses=k
      )
      sample_s, encoder_s, decoder_s = median_times([sample_fn, encode_fn, denoise_fn(k)], repeats)
      expected_s = encoder_s + s * decoder_s
      lines.append(
          f'| {s} | {k} | {1e3 * sample_s:.1f} | {1e3 * sample_s / batch:.2f} | '
          f'{batch / sample_s:.1f} | {1e3 * encoder_s:.1f} | '
          f'{1e3 * decoder_s:.1f} | {1e3 * expected_s:.1f} | '
          f'{sample_s / expected_s:.2f} |'
      )
      print(lines[-1], flush=True)
  if not with_compile:
    return lines + ['']
  compile_10 = compile_time(model, params, images, 10)
  compile_50 = compile_time(model, params, images, 50)
  lines += [
      '',
      f'compile (trace + lower + compile, K=1): S=10 {compile_10:.2f} s, '
      f'S=50 {compile_50:.2f} s (ratio {compile_50 / compile_10:.2f})',
      '',
  ]
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
      '--models',
      default='default',
      help='comma-separated: default, deit_base (DeiT-Base 224: slow on CPU)',
  )
  parser.add_argument('--steps', default='1,5,10,50')
  parser.add_argument('--hypotheses', default='1,4,16')
  parser.add_argument('--batches', default='1', help='comma-separated batch sizes')
  parser.add_argument('--compile', default='true', help='false: skip the compile-time lines')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--append', action='store_true', help='append the tables to BENCHMARKS.md')
  args = parser.parse_args(argv)
  steps = [int(s) for s in args.steps.split(',')]
  hypotheses = [int(k) for k in args.hypotheses.split(',')]

  device = jax.devices()[0]
  lines = [
      '## Sampling (benchmarks/sampling.py)',
      '',
      f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, jax '
      f'{jax.__version__}, {device.platform} ({device.device_kind}), '
      f'{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; '
      f'median of {args.repeats} calls after a warm-up. Target: ratio <= 1.1; compile '
      'S=50 within 20% of S=10.',
      '',
  ]
  for name in args.models.split(','):
    for batch in (int(b) for b in args.batches.split(',')):
      with_compile = args.compile.lower() == 'true'
      lines += benchmark(name, steps, hypotheses, args.repeats, batch, with_compile)
  text = '\n'.join(lines)
  print(text)
  if args.append:
    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'BENCHMARKS.md'
    )
    with open(path, 'a') as f:
      f.write('\n' + text + '\n')


if __name__ == '__main__':
  host_memory.reexec_with_huge_pages()
  main()
