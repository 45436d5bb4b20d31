"""nearest.closer_than against a float64 brute force over all pairs."""

import numpy as np
import pytest

from diffhand_jax import nearest


def _brute_force(a, b, thresholds):
  """([T, S, Pa], [T, S, Pb]) bool from full float64 distance matrices, sample by sample."""
  a_near, b_near = [], []
  for sample_a, sample_b in zip(a, b):
    distance = np.sqrt(((sample_a[:, None, :] - sample_b[None, :, :]) ** 2).sum(-1))
    a_near.append([distance.min(1) < t for t in thresholds])
    b_near.append([distance.min(0) < t for t in thresholds])
  return np.transpose(a_near, (1, 0, 2)), np.transpose(b_near, (1, 0, 2))


def _assert_matches_brute_force(a, b, thresholds):
  ours = nearest.closer_than(a, b, thresholds)
  expected = _brute_force(a, b, thresholds)
  for got, want in zip(ours, expected):
    assert got.shape == want.shape and got.dtype == bool
    np.testing.assert_array_equal(got, want)
  return ours


def test_matches_brute_force_on_uneven_sizes():
  # 70 samples (a chunk of 64 and a padded one), 37 and 50 points (not multiples of the row
  # block): the padding must change no answer.
  rng = np.random.default_rng(0)
  a = rng.normal(size=(70, 37, 3)) * 0.03
  b = a[:, :25].repeat(2, axis=1) + rng.normal(size=(70, 50, 3)) * 0.006
  ours = _assert_matches_brute_force(a, b, (0.005, 0.015))
  assert 0.1 < ours[0][0].mean() < 0.9  # both answers occur: the test can fail


def test_distances_at_the_threshold_follow_float64():
  # 400 pairs whose distances lie within 1e-7 (relative) of 5 mm, below float32's resolution
  # near the offsets used; the points of a set are 0.1 apart, so each point's nearest is its
  # own counterpart. Float32 alone gets some of them wrong; the recheck must give float64's
  # answer for every one.
  rng = np.random.default_rng(3)
  threshold = 0.005
  a = np.stack([np.arange(400) * 0.1, np.zeros(400), np.zeros(400)], axis=-1)[None] + 0.0123
  direction = rng.normal(size=(400, 3))
  direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
  length = threshold * (1.0 + rng.uniform(-1e-7, 1e-7, size=(400, 1)))
  b = a + direction * length
  a_near, b_near = _assert_matches_brute_force(a, b, (threshold,))
  assert 0 < a_near.sum() < 400 and 0 < b_near.sum() < 400
  centre = b.mean(axis=1, keepdims=True)
  float32_near, *_ = nearest._device_pass(
      (a - centre).astype(np.float32), (b - centre).astype(np.float32), np.float32([threshold])
  )
  assert (np.asarray(float32_near) != a_near).any()  # the recheck was needed


def test_far_from_the_origin():
  # Sets 1 km away with millimetre gaps: centring before the float32 cast keeps them exact.
  rng = np.random.default_rng(1)
  a = 1000.0 + rng.normal(size=(3, 40, 3)) * 0.02
  b = a + rng.normal(size=a.shape) * 0.004
  ours = _assert_matches_brute_force(a, b, (0.005, 0.015))
  assert 0.0 < ours[0][0].mean() < 1.0


def test_non_finite_points_are_never_near():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(2, 20, 3)) * 0.01
  b = a + 0.001
  a[0, 3] = np.nan
  b[1, 7, 2] = np.inf
  a_near, b_near = _assert_matches_brute_force(a, b, (0.005,))
  assert not a_near[0, 0, 3] and a_near[0, 0].sum() == 19
  assert not b_near[0, 1, 7]


@pytest.mark.parametrize(
    'a_shape, b_shape, match',
    [((2, 5, 3), (3, 5, 3), 'b must have shape'), ((2, 5, 2), (2, 5, 3), 'a must have shape')],
)
def test_bad_shapes_raise(a_shape, b_shape, match):
  with pytest.raises(ValueError, match=match):
    nearest.closer_than(np.zeros(a_shape), np.zeros(b_shape), (0.005,))


def test_empty_sets_raise():
  with pytest.raises(ValueError, match='needs points'):
    nearest.closer_than(np.zeros((2, 0, 3)), np.zeros((2, 5, 3)), (0.005,))
