"""Which points of two point sets have a point of the other set closer than a threshold.

The F-scores (`metrics.f_scores`) ask, per sample, for every point of `a`, whether some point of
`b` lies strictly closer than 5 mm / 15 mm, and the same from `b` to `a`. This module answers
both directions from one pass over the pairs:

* On the device, in float32: per sample, the squared distances of a block of 16 points of `a`
  to all points of `b` give those rows' minima and update the running column minima (a
  `lax.scan` over row blocks, samples in chunks of 64 under `lax.map`), so each pair is computed
  once for both directions and the distance matrix never exists whole. On 2 CPU cores the 3,960
  FreiHAND samples (778 x 778 points, 2.4 G pairs) take ~0.9 s, against ~6 s for exact k-d tree
  searches of both directions (benchmarks/metrics.py). `start` returns while the device works;
  `finish` waits and rechecks.
* Exact in float64 terms: coordinates are centred per sample before the cast, which bounds the
  float32 error of every distance by `_RELATIVE_TOLERANCE * (extent + threshold)`; a nearest
  distance within that tolerance of a threshold (or not finite) is recomputed in float64 on the
  host. Every answer is therefore `float64 distance < threshold`, as the official toolbox's
  k-d tree gives it.
"""

from typing import NamedTuple

import jax
from jax import numpy as jnp
import numpy as np

from diffhand_jax import checks

_ROW_BLOCK = 16  # points of `a` per scan step: [chunk, 16, points_b] squared distances at once
_SAMPLE_CHUNK = 64  # samples per lax.map step
# float32 rounding of centred coordinates (|x| <= extent), of their differences and of the
# squared sum changes a distance by less than ~6 * 2^-24 * (extent + distance); 2^-16 leaves a
# margin of ~40x and still sends only ~1 row in 10^3 to the float64 recheck.
_RELATIVE_TOLERANCE = 2.0**-16
_RECHECK_ROWS = 1024  # rows per float64 recheck step ([1024, points_b, 3] float64 at once)


def _chunk_minima(a, b):
  """Nearest squared distances both ways for one chunk of samples.

  Args:
    a: [chunk, 3, points_a] float32, points_a a multiple of _ROW_BLOCK.
    b: [chunk, 3, points_b] float32.

  Returns:
    ([chunk, points_a], [chunk, points_b]): for each point of `a` the smallest squared distance
    to `b`, and for each point of `b` the smallest to `a`.
  """
  chunk, _, points_a = a.shape
  blocks = a.reshape(chunk, 3, points_a // _ROW_BLOCK, _ROW_BLOCK).transpose(2, 0, 1, 3)

  def step(column_minima, block):  # block: [chunk, 3, _ROW_BLOCK]
    squared = sum(jnp.square(block[:, k, :, None] - b[:, k, None, :]) for k in range(3))
    return jnp.minimum(column_minima, squared.min(axis=1)), squared.min(axis=2)

  initial = jnp.full((chunk, b.shape[2]), jnp.inf, a.dtype)
  column_minima, row_minima = jax.lax.scan(step, initial, blocks)
  return row_minima.transpose(1, 0, 2).reshape(chunk, points_a), column_minima


def _pad_to_multiple(x, axis, multiple):
  """`x` extended along `axis` to a multiple of `multiple` by repeating its last entry."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, -x.shape[axis] % multiple)
  return jnp.pad(x, pad, mode='edge')


@jax.jit
def _device_pass(a, b, thresholds):
  """Nearest distances both ways and the threshold tests that float32 decides.

  Args:
    a: [samples, points_a, 3] float32, centred per sample (see the module docstring).
    b: [samples, points_b, 3] float32, centred the same way.
    thresholds: [T] float32.

  Returns:
    (a_closer [T, samples, points_a], a_unsure [samples, points_a], b_closer, b_unsure), all
    bool: `closer` is the float32 answer, `unsure` marks the rows it may get wrong.
  """
  samples, points_a, _ = a.shape
  points_b = b.shape[1]
  chunk = min(_SAMPLE_CHUNK, samples)

  def layout(x):  # [samples, points, 3] -> [chunks, chunk, 3, points]
    x = _pad_to_multiple(x, 0, chunk)
    return x.transpose(0, 2, 1).reshape(-1, chunk, 3, x.shape[1])

  # Padded points repeat a real point of their set, so they change no minimum of the other
  # set's points; their own minima are cut off. Padding `b` too keeps the vector loops whole.
  rows, columns = jax.lax.map(
      lambda pair: _chunk_minima(*pair),
      (layout(_pad_to_multiple(a, 1, _ROW_BLOCK)), layout(_pad_to_multiple(b, 1, _ROW_BLOCK))),
  )
  a_to_b = jnp.sqrt(rows.reshape(-1, rows.shape[-1])[:samples, :points_a])
  b_to_a = jnp.sqrt(columns.reshape(-1, columns.shape[-1])[:samples, :points_b])
  extent = jnp.maximum(jnp.abs(a).max(axis=(1, 2)), jnp.abs(b).max(axis=(1, 2)))
  tolerance = _RELATIVE_TOLERANCE * (extent + thresholds.max())

  def decide(nearest):  # [samples, points] -> ([T, samples, points], [samples, points])
    gap = jnp.abs(nearest[None] - thresholds[:, None, None])
    # `not gap > tolerance` also marks NaN (non-finite input) as unsure.
    return nearest[None] < thresholds[:, None, None], jnp.any(
        ~(gap > tolerance[None, :, None]), axis=0
    )

  return (*decide(a_to_b), *decide(b_to_a))


def _recheck(closer, unsure, a, b, thresholds):
  """`closer` with the unsure rows replaced by the float64 answer.

  Args:
    closer: [T, samples, points_a] bool from the device pass.
    unsure: [samples, points_a] bool.
    a: [samples, points_a, 3] float64 (as given by the caller, not centred).
    b: [samples, points_b, 3] float64.
    thresholds: [T] float64.

  Returns:
    [T, samples, points_a] bool: float64 nearest distance from `a` to `b` < threshold.
  """
  closer = np.array(closer)
  samples, rows = np.nonzero(np.asarray(unsure))
  for start in range(0, samples.size, _RECHECK_ROWS):
    s, r = samples[start : start + _RECHECK_ROWS], rows[start : start + _RECHECK_ROWS]
    exact = np.sqrt(np.sum(np.square(b[s] - a[s, r][:, None]), axis=-1)).min(axis=1)
    closer[:, s, r] = exact[None] < thresholds[:, None]
  return closer


class Pending(NamedTuple):
  """A device pass under way (`start`) and what `finish` needs to complete it."""

  device_answers: tuple  # (a_closer, a_unsure, b_closer, b_unsure) device arrays
  a: np.ndarray  # [samples, points_a, 3] float64, as given
  b: np.ndarray  # [samples, points_b, 3] float64, as given
  thresholds: np.ndarray  # [T] float64


def start(a, b, thresholds) -> Pending:
  """Checks the inputs and starts the device pass of `closer_than`; returns without waiting.

  JAX dispatches asynchronously, so the host is free until `finish` (metrics.freihand_metrics
  aligns the next prediction set meanwhile). Args as `closer_than`.
  """
  a = checks.check_array('a', a, ('samples', 'points_a', 3), dtype=np.float64, finite=False)
  b = checks.check_array('b', b, (a.shape[0], 'points_b', 3), dtype=np.float64, finite=False)
  thresholds = np.asarray(thresholds, np.float64).reshape(-1)
  if a.shape[0] == 0 or a.shape[1] == 0 or b.shape[1] == 0:
    raise ValueError(f'closer_than needs points in every set, got shapes {a.shape}, {b.shape}')
  # Centred in float64, rounded to float32 once (one pass each: numpy casts as it stores).
  with np.errstate(invalid='ignore'):  # inf - inf: NaN, which the device pass marks unsure
    centre = np.einsum('spk->sk', b)[:, None] / b.shape[1]
    a_centred = np.subtract(a, centre, out=np.empty(a.shape, np.float32), casting='same_kind')
    b_centred = np.subtract(b, centre, out=np.empty(b.shape, np.float32), casting='same_kind')
  answers = _device_pass(a_centred, b_centred, thresholds.astype(np.float32))
  return Pending(answers, a, b, thresholds)


def finish(pending: Pending):
  """Waits for the device pass and rechecks its unsure rows: the result of `closer_than`."""
  a_closer, a_unsure, b_closer, b_unsure = pending.device_answers
  a, b, thresholds = pending.a, pending.b, pending.thresholds
  return (
      _recheck(a_closer, a_unsure, a, b, thresholds),
      _recheck(b_closer, b_unsure, b, a, thresholds),
  )


def closer_than(a, b, thresholds):
  """For each point, whether the other set has a point strictly closer than each threshold.

  Exactly `nearest float64 distance < threshold` in both directions (see the module docstring).

  Args:
    a: [samples, points_a, 3].
    b: [samples, points_b, 3], the same number of samples.
    thresholds: T distances, in the units of the points.

  Returns:
    ([T, samples, points_a] bool, [T, samples, points_b] bool): a's points near b, b's near a.
  """
  return finish(start(a, b, thresholds))
