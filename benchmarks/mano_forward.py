"""Times the jitted MANO forward pass (vertices + 21 joints) on the default device.

Usage: python benchmarks/mano_forward.py [--batch 64] [--repeats 20]
Prints the first-call (compile) time and the median / min wall time per call after it.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffhand_jax import mano  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffhand_jax import procedural_mano  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=20)
  args = parser.parse_args(argv)
  model = procedural_mano.procedural_hand(0)
  rng = np.random.default_rng(0)
  pose = (0.5 * rng.standard_normal((args.batch, 48))).astype(np.float32)
  betas = rng.standard_normal((args.batch, 10)).astype(np.float32)
  pose, betas = jax.device_put(pose), jax.device_put(betas)
  forward = jax.jit(mano.mano_forward)

  # numpy model: its arrays (1.9 MB) are copied in on every call; device model: resident.
  for label, arg in (('numpy model', model), ('device model', jax.device_put(model))):
    start = time.perf_counter()
    jax.block_until_ready(forward(arg, pose, betas))
    first_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(forward(arg, pose, betas))
      times.append(time.perf_counter() - start)
    print(
        f'mano_forward batch={args.batch} on {jax.devices()[0].platform}, {label}: '
        f'first call {first_s:.2f} s, median {1e3 * np.median(times):.2f} ms, '
        f'min {1e3 * np.min(times):.2f} ms over {args.repeats} calls'
    )


if __name__ == '__main__':
  main()
