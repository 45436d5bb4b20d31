"""The CPU rewrites behind `config.model.cpu_kernels`, measured against the plain path.

The model's standard path is plain Flax/JAX; `config.model.cpu_kernels=True` (configs/synthetic.py
only) swaps in CPU forms of three pieces, and convolutions take their im2col form on any CPU
backend (models/conv.py). Each piece can be switched back to its plain form here (by patching the
module attribute the model calls):
  attention  models.attention.dot_product_attention (hand-written VJP) vs jax.nn.dot_product_attention
  dense      models.cpu_kernels.linear (hand-written VJP: plain-layout products, one bias reduction)
             vs x @ kernel + bias through autodiff (every dense layer and attention projection)
  gelu       models.cpu_kernels.erf_gelu vs nn.gelu(approximate=False) (erfc)
  conv       models.conv.conv2d_patches (im2col + one product) vs lax.conv_general_dilated

Table 1 (kernels): forward + backward (a VJP with a random cotangent) of each piece alone at the
sizes of the synthetic default (batch 32), median of 5 x 5 calls. Table 2 (train step): the exact
DiffHand train step of the synthetic config (benchmarks/train_step.py) compiled once per variant
(the switch off as shipped to GPUs, everything plain, each rewrite alone, the switch on), then
timed in interleaved rounds of 3 steps so that load from other processes falls on every variant
alike; the ratio is the median of the per-round ratios to the switch-off step. The first-step
losses are printed: the rewrites change float rounding only.

Usage:
  .venv/bin/python benchmarks/cpu_kernels.py                 # ~12 min on 2 cores
  .venv/bin/python benchmarks/cpu_kernels.py --rounds=12 --skip_kernels
"""

import argparse
import os
import platform
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import train_step as train_step_bench
from diffhand_jax import host_memory
from diffhand_jax.models import attention as attention_lib
from diffhand_jax.models import conv as conv_lib
from diffhand_jax.models import cpu_kernels


def _plain_gelu(x):
  return nn.gelu(x, approximate=False)


def _plain_linear(x, kernel, bias):
  return jnp.dot(x, kernel) + bias


def _plain_attention(query, key, value):
  return jax.nn.dot_product_attention(query, key, value)


# name -> (module, attribute, rewritten form, plain form)
REWRITES = {
    'attention': (
        attention_lib,
        'dot_product_attention',
        attention_lib.dot_product_attention,
        _plain_attention,
    ),
    'conv': (conv_lib, 'conv2d_patches', conv_lib.conv2d_patches, conv_lib.conv2d_lax),
    'gelu': (cpu_kernels, 'erf_gelu', cpu_kernels.erf_gelu, _plain_gelu),
    'dense': (cpu_kernels, 'linear', cpu_kernels.linear, _plain_linear),
}


def use(rewritten: set) -> None:
  """Installs the rewritten form of the pieces named in `rewritten`, the plain form of the rest."""
  for name, (module, attribute, new, old) in REWRITES.items():
    setattr(module, attribute, new if name in rewritten else old)


def time_calls(fn, *args, calls: int = 5, repeats: int = 5) -> float:
  """Median seconds per call of a jitted fn (after one warm-up call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return float(np.median(times))


def kernel_cases():
  """(label, rewrite name, forward fn, args) at the synthetic default's sizes (batch 32)."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  cases = []
  for label, points, keys in [
      ('self-attention 194 points', 194, 194),
      ('cross 194 -> 16', 194, 16),
  ]:
    q, k, v = normal(32, points, 4, 16), normal(32, keys, 4, 16), normal(32, keys, 4, 16)
    cases.append(
        (label, 'attention', lambda *a: attention_lib.dot_product_attention(*a), (q, k, v))
    )
  for label, size, cin, cout, stride in [
      ('conv 3x3 stem 64 px, 3 -> 32, /2', 64, 3, 32, 2),
      ('conv 3x3 stage 4, 4 -> 2 px, 128 -> 256, /2', 4, 128, 256, 2),
      ('conv 3x3 stage 4, 2 px, 256 -> 256', 2, 256, 256, 1),
  ]:
    x, w = normal(32, size, size, cin), normal(3, 3, cin, cout) * 0.1
    cases.append(
        (label, 'conv', lambda x, w, s=stride: conv_lib.conv2d_patches(x, w, s, 1), (x, w))
    )
  cases.append(
      ('GELU [32, 778, 256]', 'gelu', lambda x: cpu_kernels.erf_gelu(x), (normal(32, 778, 256),))
  )
  # A decoder feature block's MLP at full resolution: 64 -> 256 -> 64 over 778 points.
  linear = lambda x, w, b: cpu_kernels.linear(x, w, b)
  mlp = lambda x, w1, b1, w2, b2: linear(_plain_gelu(linear(x, w1, b1)), w2, b2)
  cases.append(
      (
          'MLP [32, 778, 64] -> 256 -> 64',
          'dense',
          mlp,
          (
              normal(32, 778, 64),
              normal(64, 256) * 0.1,
              normal(256),
              normal(256, 64) * 0.1,
              normal(64),
          ),
      )
  )
  return cases


def _loss_gradient(fn, args):
  """(fresh jit of value_and_grad of sum(fn(...) * c), the arguments with c appended).

  The jit is fresh so that the forms installed now are traced. c is a random cotangent passed
  as an argument (a constant would let XLA fold the backward pass away): the backward pass gets
  a general input, and no costly elementwise function (XLA CPU's sin takes ~25 ns an element)
  hides the piece measured.
  """
  shape = jax.eval_shape(fn, *args)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=shape.shape), shape.dtype)
  loss = lambda *a: jnp.sum(fn(*a[:-1]) * a[-1])
  return (
      jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))))),
      (*args, cotangent),
  )


def kernel_table() -> list:
  rows = []
  for label, name, fn, args in kernel_cases():
    times = {}
    for form in ('plain', 'rewritten'):
      use({name} if form == 'rewritten' else set())
      grad, grad_args = _loss_gradient(fn, args)
      times[form] = time_calls(grad, *grad_args)
    rows.append(
        f'| {label} | {1e3 * times["plain"]:.2f} | {1e3 * times["rewritten"]:.2f} | '
        f'{times["rewritten"] / times["plain"]:.2f} |'
    )
    print(rows[-1], flush=True)
  use(set(REWRITES))
  return rows


def step_variants() -> dict:
  """label -> (config.model.cpu_kernels, the pieces in their rewritten form)."""
  variants = {
      'switch off (the plain path; im2col conv)': (False, {'conv'}),
      'all plain (switch off, lax conv)': (False, set()),
  }
  for name in REWRITES:
    if name != 'conv':  # conv alone is the first row
      variants[f'{name} only (on the all-plain step)'] = (True, {name})
  variants['**switch on (every rewrite)**'] = (True, set(REWRITES))
  return variants


def step_table(rounds: int) -> list:
  built = {}
  for label, (switch, rewritten) in step_variants().items():
    use(rewritten)
    print(f'compiling the train step: {label} ...', flush=True)
    config = train_step_bench.make_config('synthetic', 'float32', False)
    config.model.cpu_kernels = switch
    step, state, batch = train_step_bench.build_step(config)
    compiled = step.lower(state, batch).compile()
    state, metrics = compiled(state, batch)
    built[label] = [compiled, state, batch, float(metrics['loss']), []]
  use(set(REWRITES))
  for index in range(rounds):
    for entry in built.values():
      compiled, state, batch = entry[:3]
      start = time.perf_counter()
      for _ in range(3):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state.params, metrics))
      entry[1] = state
      entry[4].append((time.perf_counter() - start) / 3)
    print(f'round {index + 1}/{rounds}', flush=True)
  base = np.asarray(built[next(iter(built))][4])
  rows = []
  for label, (_, _, _, loss, times) in built.items():
    times = np.asarray(times)
    rows.append(
        f'| {label} | {1e3 * np.median(times):.0f} ({1e3 * times.min():.0f}-'
        f'{1e3 * times.max():.0f}) | {np.median(times / base):.3f} | {loss:.6f} |'
    )
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=8, help='interleaved rounds of 3 steps')
  parser.add_argument('--skip_kernels', action='store_true')
  parser.add_argument('--skip_step', action='store_true')
  args = parser.parse_args(argv)
  machine = (
      f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {platform.platform()}, '
      f'{os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.default_backend()}'
  )
  print(machine, flush=True)
  kernels = [] if args.skip_kernels else kernel_table()
  steps = [] if args.skip_step else step_table(args.rounds)
  print(f'\n{machine}')
  if kernels:
    print('\n| forward + backward, batch 32 | plain ms | rewritten ms | ratio |')
    print('|---|---:|---:|---:|')
    print('\n'.join(kernels))
  if steps:
    print(
        '\n| synthetic train step, batch 32 | ms, median (min-max) | ratio to switch off | '
        'first loss |'
    )
    print('|---|---:|---:|---:|')
    print('\n'.join(steps))


if __name__ == '__main__':
  host_memory.reexec_with_huge_pages()
  main()
