"""How large the lowered train step of each shipped config is, without allocating a weight.

Each config's train step (as launch.py builds it, benchmarks/train_step.py) is lowered to
StableHLO over abstract arguments (`jax.ShapeDtypeStruct`); the table gives the parameter count,
the module's text size and its largest constant. Nothing in a compiled program should grow with
the model (the parameters are arguments): a constant of the parameters' size means an array
was captured from Python (tests/test_lowered_size.py bounds it).

Usage:
  .venv/bin/python benchmarks/lowered_size.py                       # every shipped config
  .venv/bin/python benchmarks/lowered_size.py --configs=freihand --encoder_size=large
"""

import argparse
import os
import re
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import train_step as train_step_bench
from configs import dexycb, freihand, freihand_depth, ho3d, synthetic
from diffhand_jax import models

CONFIGS = {
    'synthetic': synthetic.get_config,
    'freihand': freihand.get_config,
    'freihand_depth': freihand_depth.get_config,
    'dexycb': dexycb.get_config,
    'ho3d': ho3d.get_config,
}
_CONSTANT = re.compile(r'stablehlo\.constant dense<.*?> : tensor<([0-9x]*)([a-z]+[0-9]*)>')
_BITS = {'f': 32, 'i': 32, 'u': 32}


def constant_bytes(text: str) -> list:
  """Bytes of every `stablehlo.constant` in a module's text (element count x element size)."""
  sizes = []
  for dims, dtype in _CONSTANT.findall(text):
    count = int(np.prod([int(d) for d in dims.split('x') if d])) if dims else 1
    bits = int(re.sub(r'\D', '', dtype) or _BITS.get(dtype[0], 8))
    sizes.append(count * max(bits // 8, 1))
  return sizes


def lowered_train_step(config, batch_size: int = 2) -> tuple:
  """(StableHLO text of the train step, parameter count), over abstract arguments only."""
  model = models.build_model(config)
  params = train_step_bench.abstract_params(model, config)
  step_fn, layout, state = train_step_bench.step_parts(config, model, params)
  state = jax.eval_shape(layout.to_step, state)
  batch = jax.eval_shape(lambda: train_step_bench.synthetic_batch(config, batch_size))
  text = jax.jit(step_fn, donate_argnums=(0,)).lower(state, batch).as_text()
  return text, sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', default=','.join(CONFIGS))
  parser.add_argument('--encoder_size', default='', help='override config.model.encoder_size')
  args = parser.parse_args(argv)
  print(f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, jax {jax.__version__}')
  print('\n| config | parameters | lowered step | largest constant | lowering s |')
  print('|---|---:|---:|---:|---:|')
  for name in args.configs.split(','):
    config = CONFIGS[name]()
    config.model.pretrained_path = ''  # no weights are read: shapes only
    if args.encoder_size:
      config.model.encoder_size = args.encoder_size
    start = time.perf_counter()
    text, count = lowered_train_step(config)
    label = f'{name} ({config.model.encoder}-{config.model.encoder_size})'
    print(
        f'| {label} | {count / 1e6:.1f} M | {len(text) / 1e6:.2f} MB | '
        f'{max(constant_bytes(text), default=0) / 1e3:.1f} kB | '
        f'{time.perf_counter() - start:.0f} |',
        flush=True,
    )


if __name__ == '__main__':
  main()
