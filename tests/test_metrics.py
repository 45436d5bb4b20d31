"""Tests for diffhand_jax/metrics.py against closed forms and independent loop implementations."""

import json
import time

import numpy as np
import pytest
from scipy import linalg

from diffhand_jax import metrics

_THRESHOLDS = np.linspace(0.0, 0.05, 100)
_STEP = 0.05 / 99


def _grid(num_points, spacing):
  """Points on a regular grid, `spacing` metres apart, [num_points, 3]."""
  side = int(np.ceil(num_points ** (1 / 3)))
  ijk = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing='ij'), -1).reshape(-1, 3)
  return ijk[:num_points].astype(np.float64) * spacing


def _random_hands(rng, num_samples):
  """Random joint and vertex sets of hand size (a few cm), [N, 21, 3] and [N, 778, 3]."""
  joints = rng.normal(size=(num_samples, 21, 3)) * 0.04
  verts = rng.normal(size=(num_samples, 778, 3)) * 0.04
  return joints, verts


def _random_rotation(rng):
  q, r = np.linalg.qr(rng.normal(size=(3, 3)))
  q = q * np.sign(np.diag(r))
  if np.linalg.det(q) < 0:
    q[:, 0] = -q[:, 0]
  return q


def _step_auc(distance):
  """Closed-form AUC over the official thresholds when every error equals `distance`.

  PCK(t) = 1 for t >= distance (official `<=`), else 0. With k0 the first threshold index at or
  above `distance`, the trapezoids right of t_k0 each add one step, the one ending at t_k0 adds
  half a step (k0 > 0); normalised by the threshold range 0.05.
  """
  k0 = int(np.argmax(_THRESHOLDS >= distance))
  area = (99 - k0) * _STEP + (0.5 * _STEP if k0 > 0 else 0.0)
  return area / 0.05


def _official_align_loop(gt, pred):
  """The official align_w_scale, one sample at a time, with scipy's orthogonal_procrustes."""
  out = []
  for g, p in zip(gt, pred):
    g_mean = g.mean(0)
    g_c = g - g_mean
    p_c = p - p.mean(0)
    s1 = np.linalg.norm(g_c) + 1e-8
    s2 = np.linalg.norm(p_c) + 1e-8
    rot, scale = linalg.orthogonal_procrustes(g_c / s1, p_c / s2)
    out.append((p_c / s2) @ rot.T * scale * s1 + g_mean)
  return np.stack(out)


def _least_squares_similarity_loop(gt, pred):
  """Independent form: argmin over s, orthogonal Q, t of |s P Q + t - G|^2, per sample.

  Q = U V^T from svd(P_c^T G_c) (reflections allowed, as the official code), s = trace(S) /
  |P_c|^2, t from the means. Equals the official result up to its 1e-8 norm epsilons.
  """
  out = []
  for g, p in zip(gt, pred):
    g_c = g - g.mean(0)
    p_c = p - p.mean(0)
    u, s, vt = np.linalg.svd(p_c.T @ g_c)
    q = u @ vt
    scale = s.sum() / np.sum(p_c**2)
    out.append(scale * p_c @ q + g.mean(0))
  return np.stack(out)


def _f_score_loop(gt, pred, threshold):
  """Brute-force per-sample F-score, full distance matrix, strict `<`."""
  scores = []
  for g, p in zip(gt, pred):
    dist = np.sqrt(((p[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    precision = np.mean(dist.min(1) < threshold)
    recall = np.mean(dist.min(0) < threshold)
    scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
  return np.array(scores)


# The official alignment adds 1e-8 to both Frobenius norms, which shrinks an exact copy by a
# relative ~1e-7: aligned errors of an exact match are ~1e-6 mm, not 0.
_PA_TOL_MM = 1e-4


def _official_measures(per_point_distances):
  """EvalUtil.get_measures(0, 0.05, 100) as a loop: per point (keypoint / vertex) over samples.

  Args:
    per_point_distances: [points][samples] Euclidean distances in metres.

  Returns:
    (mean error, AUC): means over points of per-point means and per-point AUCs.
  """
  norm = np.trapezoid(np.ones_like(_THRESHOLDS), _THRESHOLDS)
  means, aucs = [], []
  for data in per_point_distances:
    data = np.array(data)
    means.append(np.mean(data))
    pck = [np.mean((data <= t).astype(float)) for t in _THRESHOLDS]
    aucs.append(np.trapezoid(pck, _THRESHOLDS) / norm)
  return np.mean(means), np.mean(aucs)


def _official_eval_loop(pred_j, pred_v, gt_j, gt_v):
  """The official eval.py main loop, sample by sample, written out independently."""
  xyz, xyz_al = [[] for _ in range(21)], [[] for _ in range(21)]
  mesh, mesh_al = [[] for _ in range(778)], [[] for _ in range(778)]
  f, f_al = {5: [], 15: []}, {5: [], 15: []}
  for i in range(len(gt_j)):
    aligned_j = _official_align_loop(gt_j[i : i + 1], pred_j[i : i + 1])[0]
    aligned_v = _official_align_loop(gt_v[i : i + 1], pred_v[i : i + 1])[0]
    for store, gt, pred in (
        (xyz, gt_j[i], pred_j[i]),
        (xyz_al, gt_j[i], aligned_j),
        (mesh, gt_v[i], pred_v[i]),
        (mesh_al, gt_v[i], aligned_v),
    ):
      for k, d in enumerate(np.sqrt(np.sum((gt - pred) ** 2, axis=1))):
        store[k].append(d)
    for mm in (5, 15):
      f[mm].append(_f_score_loop(gt_v[i : i + 1], pred_v[i : i + 1], mm / 1000)[0])
      f_al[mm].append(_f_score_loop(gt_v[i : i + 1], aligned_v[None], mm / 1000)[0])
  out = {}
  for (name, auc_name), store in (
      (('mpjpe', 'auc_joints'), xyz),
      (('pa_mpjpe', 'pa_auc_joints'), xyz_al),
      (('mpvpe', 'auc_verts'), mesh),
      (('pa_mpvpe', 'pa_auc_verts'), mesh_al),
  ):
    mean, auc = _official_measures(store)
    out[name], out[auc_name] = mean * 1000, auc
  for mm in (5, 15):
    out[f'f{mm}'], out[f'pa_f{mm}'] = np.mean(f[mm]), np.mean(f_al[mm])
  return out


def test_all_metrics_match_the_official_loop():
  rng = np.random.default_rng(7)
  gt_j, gt_v = _random_hands(rng, 6)
  # Noise of a few mm around the thresholds, plus a rotation/scale/shift on some samples.
  pred_j = gt_j + rng.normal(size=gt_j.shape) * 0.006
  pred_v = gt_v + rng.normal(size=gt_v.shape) * 0.006
  for i in (1, 4):
    rot = _random_rotation(rng)
    pred_j[i] = 1.1 * pred_j[i] @ rot + 0.03
    pred_v[i] = 1.1 * pred_v[i] @ rot + 0.03
  ours = metrics.freihand_metrics(pred_j, pred_v, gt_j, gt_v)
  reference = _official_eval_loop(pred_j, pred_v, gt_j, gt_v)
  assert set(ours) == set(reference)
  for key, value in reference.items():
    assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
  assert 0.05 < ours['f5'] < 0.95 and 0.05 < ours['pa_f5'] < 0.95  # not a trivial case


def test_perfect_prediction():
  joints, verts = _random_hands(np.random.default_rng(0), 5)
  m = metrics.freihand_metrics(joints, verts, joints, verts)
  assert set(m) == set(metrics.METRIC_KEYS)
  assert m['mpjpe'] == 0.0 and m['mpvpe'] == 0.0
  assert m['pa_mpjpe'] < _PA_TOL_MM and m['pa_mpvpe'] < _PA_TOL_MM
  for key in ('auc_joints', 'auc_verts', 'f5', 'f15', 'pa_f5', 'pa_f15'):
    assert m[key] == 1.0
  # Aligned errors are tiny but not 0, so they miss only the threshold 0 (as officially).
  for key in ('pa_auc_joints', 'pa_auc_verts'):
    assert m[key] == pytest.approx(_step_auc(1e-12), abs=1e-12)


@pytest.mark.parametrize('reflect', [False, True])
def test_similarity_transform_is_aligned_away(reflect):
  rng = np.random.default_rng(1)
  joints, verts = _random_hands(rng, 4)
  pred_j, pred_v = [], []
  for j, v in zip(joints, verts):
    rot = _random_rotation(rng)
    if reflect:  # the official alignment does not fix det(R), so mirrors align too
      rot = rot @ np.diag([1.0, 1.0, -1.0])
    scale = rng.uniform(0.5, 2.0)
    shift = rng.normal(size=3) * 0.2
    pred_j.append(scale * j @ rot + shift)
    pred_v.append(scale * v @ rot + shift)
  m = metrics.freihand_metrics(np.stack(pred_j), np.stack(pred_v), joints, verts)
  assert m['pa_mpjpe'] < _PA_TOL_MM and m['pa_mpvpe'] < _PA_TOL_MM
  assert m['pa_f5'] == 1.0 and m['pa_f15'] == 1.0
  assert m['pa_auc_joints'] > 0.99 and m['pa_auc_verts'] > 0.99
  assert m['mpjpe'] > 10.0 and m['mpvpe'] > 10.0  # unaligned errors see the transform


@pytest.mark.parametrize('offset_mm', [3.0, 10.0, 20.0])
def test_constant_offset_closed_form(offset_mm):
  # Points 50 mm apart, so each point's nearest neighbour after the shift is its own copy.
  gt_v = np.stack([_grid(778, 0.05), _grid(778, 0.05) + 0.01])
  gt_j = np.stack([_grid(21, 0.05), _grid(21, 0.05) - 0.02])
  direction = np.array([2.0, -1.0, 2.0]) / 3.0
  shift = offset_mm / 1000.0 * direction
  m = metrics.freihand_metrics(gt_j + shift, gt_v + shift, gt_j, gt_v)
  assert m['mpjpe'] == pytest.approx(offset_mm, rel=1e-9)
  assert m['mpvpe'] == pytest.approx(offset_mm, rel=1e-9)
  assert m['auc_joints'] == pytest.approx(_step_auc(offset_mm / 1000.0), abs=1e-12)
  assert m['auc_verts'] == pytest.approx(_step_auc(offset_mm / 1000.0), abs=1e-12)
  assert m['f5'] == (1.0 if offset_mm < 5 else 0.0)
  assert m['f15'] == (1.0 if offset_mm < 15 else 0.0)
  # A translation is aligned away.
  assert m['pa_mpjpe'] < _PA_TOL_MM and m['pa_mpvpe'] < _PA_TOL_MM
  assert m['pa_f5'] == 1.0


def test_pck_counts_errors_equal_to_a_threshold():
  # The official PCK uses `<=`: an error exactly at threshold k counts from k on.
  errors = np.full((3, 21), _THRESHOLDS[50])
  mean, auc = metrics._mean_and_auc(errors)
  assert mean == pytest.approx(_THRESHOLDS[50], rel=1e-12)
  expected = ((99 - 50) * _STEP + 0.5 * _STEP) / 0.05
  assert auc == pytest.approx(expected, abs=1e-12)


def test_alignment_matches_independent_loops():
  rng = np.random.default_rng(2)
  gt = rng.normal(size=(6, 21, 3)) * 0.05
  pred = gt @ _random_rotation(rng) * 1.3 + rng.normal(size=(6, 21, 3)) * 0.01 + 0.1
  pred[0] = gt[0] * np.array([-1.0, 1.0, 1.0])  # a mirror image, aligned by a reflection
  ours = metrics.align_w_scale(gt, pred)
  np.testing.assert_allclose(ours, _official_align_loop(gt, pred), atol=1e-12)
  np.testing.assert_allclose(ours, _least_squares_similarity_loop(gt, pred), atol=1e-7)
  np.testing.assert_allclose(ours[0], gt[0], atol=1e-7)


def test_f_scores_match_brute_force():
  rng = np.random.default_rng(3)
  gt = rng.normal(size=(5, 778, 3)) * 0.03
  # Noise of the size of the thresholds: many nearest distances near 5 and 15 mm.
  pred = gt + rng.normal(size=gt.shape) * 0.006
  pred[1] += 0.5  # far away: P = R = 0, F = 0
  pred[2] = gt[2, ::-1]  # same point set in another order: F = 1
  scores = metrics.f_scores(gt, pred)
  for threshold, row in zip(metrics.F_THRESHOLDS_M, scores):
    np.testing.assert_allclose(row, _f_score_loop(gt, pred, threshold), atol=1e-12)
  assert scores[0, 1] == 0.0 and scores[1, 1] == 0.0
  assert scores[0, 2] == 1.0 and 0.0 < scores[0, 0] < 1.0


def test_f_scores_match_brute_force_with_other_point_counts():
  rng = np.random.default_rng(8)
  gt = rng.normal(size=(4, 300, 3)) * 0.02
  pred = gt[:, :200] + rng.normal(size=(4, 200, 3)) * 0.006
  scores = metrics.f_scores(gt, pred)
  for threshold, row in zip(metrics.F_THRESHOLDS_M, scores):
    np.testing.assert_allclose(row, _f_score_loop(gt, pred, threshold), atol=1e-12)


def test_f_score_threshold_is_strict():
  gt = _grid(8, 1.0)[None]  # integer coordinates: distances below are exact
  pred = gt + np.array([0.25, 0.0, 0.0])
  assert metrics.f_scores(gt, pred, thresholds=(0.25,))[0, 0] == 0.0
  assert metrics.f_scores(gt, pred, thresholds=(0.2500001,))[0, 0] == 1.0


def test_f_score_differing_point_counts():
  # Precision and recall differ: 2 of 4 predictions near GT, all 2 GT points matched.
  gt = np.array([[[0.0, 0, 0], [1.0, 0, 0]]])
  pred = np.array([[[0.0, 0, 0], [1.0, 0, 0], [5.0, 0, 0], [9.0, 0, 0]]])
  precision, recall = 0.5, 1.0
  assert metrics.f_scores(gt, pred, thresholds=(0.1,))[0, 0] == pytest.approx(
      2 * precision * recall / (precision + recall)
  )


@pytest.mark.parametrize('bad', ['shape', 'count', 'nan'])
def test_bad_input_raises(bad):
  joints, verts = _random_hands(np.random.default_rng(4), 3)
  pred_j, pred_v = joints.copy(), verts.copy()
  if bad == 'shape':
    pred_v = pred_v[:, :700]
  elif bad == 'count':
    pred_j = pred_j[:2]
  else:
    pred_j[1, 3, 0] = np.nan
  with pytest.raises(ValueError, match='pred_'):
    metrics.freihand_metrics(pred_j, pred_v, joints, verts)


def test_write_pred_json_official_layout(tmp_path):
  joints, verts = _random_hands(np.random.default_rng(5), 3)
  path = tmp_path / 'sub' / 'pred.json'
  metrics.write_pred_json(str(path), joints.astype(np.float32), verts)
  with open(path) as f:
    loaded = json.load(f)
  assert len(loaded) == 2 and len(loaded[0]) == 3 and len(loaded[1]) == 3
  np.testing.assert_allclose(np.array(loaded[0]), joints.astype(np.float32), rtol=1e-7)
  np.testing.assert_array_equal(np.array(loaded[1]), verts)
  with pytest.raises(ValueError, match='verts'):
    metrics.write_pred_json(str(path), joints, verts[:, :21])


def test_write_scores_txt_official_names_and_units(tmp_path):
  values = {key: float(i + 1) for i, key in enumerate(metrics.METRIC_KEYS)}
  path = tmp_path / 'scores.txt'
  metrics.write_scores_txt(str(path), values)
  lines = path.read_text().splitlines()
  expected = [
      ('xyz_mean3d', values['mpjpe'] / 10),
      ('xyz_auc3d', values['auc_joints']),
      ('xyz_al_mean3d', values['pa_mpjpe'] / 10),
      ('xyz_al_auc3d', values['pa_auc_joints']),
      ('mesh_mean3d', values['mpvpe'] / 10),
      ('mesh_auc3d', values['auc_verts']),
      ('mesh_al_mean3d', values['pa_mpvpe'] / 10),
      ('mesh_al_auc3d', values['pa_auc_verts']),
      ('f_score_5', values['f5']),
      ('f_al_score_5', values['pa_f5']),
      ('f_score_15', values['f15']),
      ('f_al_score_15', values['pa_f15']),
  ]
  assert lines == ['%s: %f' % item for item in expected]
  with pytest.raises(ValueError, match='pa_f15'):
    metrics.write_scores_txt(str(path), {k: v for k, v in values.items() if k != 'pa_f15'})


def test_format_table_shows_values():
  values = {key: 0.5 + i for i, key in enumerate(metrics.METRIC_KEYS)}
  values['extra'] = 7.0
  values['num_examples'] = 3960
  table = metrics.format_table(values)
  assert '0.50' in table and '3.50' in table  # mpjpe, pa_mpvpe (mm, 2 digits)
  assert '11.500' in table  # pa_f15
  assert 'extra: 7.0000' in table and 'num_examples: 3960' in table


@pytest.mark.slow
def test_full_evaluation_set_runs():
  rng = np.random.default_rng(6)
  gt_j, gt_v = _random_hands(rng, 3960)
  start = time.perf_counter()
  m = metrics.freihand_metrics(
      gt_j + rng.normal(size=gt_j.shape) * 0.005,
      gt_v + rng.normal(size=gt_v.shape) * 0.005,
      gt_j,
      gt_v,
  )
  print(f'freihand_metrics on 3,960 samples: {time.perf_counter() - start:.2f} s')
  # Per-coordinate noise of 5 mm: mean 3D error = 5 mm * sqrt(8/pi) (chi distribution, 3 dof).
  assert m['mpvpe'] == pytest.approx(5.0 * np.sqrt(8 / np.pi), rel=0.01)


# ---- Roughness (issue 36) ----


def _naive_roughness(verts, faces):
  """One mesh [V, 3]: a Python loop over vertices, neighbours collected edge by edge."""
  neighbours = [set() for _ in range(len(verts))]
  for face in faces:
    for a in face:
      for b in face:
        if a != b:
          neighbours[int(a)].add(int(b))
  lengths = []
  for v, ring in enumerate(neighbours):
    if ring:
      centre = np.mean([verts[u] for u in sorted(ring)], axis=0)
      lengths.append(np.linalg.norm(verts[v] - centre))
  return float(np.mean(lengths))


def _grid_mesh(side, spacing=1.0):
  """A flat side x side vertex grid in z = 0, each square split along the same diagonal
  (interior vertices then have 6 neighbours placed symmetrically about them)."""
  i, j = np.meshgrid(np.arange(side), np.arange(side), indexing='ij')
  verts = np.stack([i, j, np.zeros_like(i)], -1).reshape(-1, 3).astype(np.float64) * spacing
  faces = []
  for a in range(side - 1):
    for b in range(side - 1):
      v00, v01, v10, v11 = (
          a * side + b,
          a * side + b + 1,
          (a + 1) * side + b,
          (a + 1) * side + b + 1,
      )
      faces += [(v00, v10, v11), (v00, v11, v01)]
  return verts, np.array(faces)


def test_roughness_matches_a_naive_loop_on_the_hand_mesh():
  from diffhand_jax import procedural_mano  # pylint: disable=g-import-not-at-top

  hand = procedural_mano.procedural_hand(0)
  faces = np.asarray(hand.faces)
  assert faces.shape == (1538, 3)
  rng = np.random.default_rng(0)
  verts = np.asarray(hand.v_template)[None] + rng.normal(size=(3, 778, 3)) * 0.002
  got = metrics.roughness(verts, faces)
  assert got.shape == (3,)
  for mesh, value in zip(verts, got):
    assert value == pytest.approx(_naive_roughness(mesh, faces), rel=1e-12)


def test_roughness_matches_a_naive_loop_on_a_small_random_mesh():
  rng = np.random.default_rng(1)
  faces = np.array([(0, 1, 2), (0, 2, 3), (1, 2, 4), (2, 3, 4), (0, 3, 5), (5, 5, 0)])
  verts = rng.normal(size=(4, 7, 3))  # vertex 6 is in no face: left out of the mean
  got = metrics.roughness(verts, faces)
  np.testing.assert_allclose(got, [_naive_roughness(v, faces) for v in verts], rtol=1e-12)


def test_roughness_closed_forms():
  # Regular octahedron of radius r: the 4 neighbours of each vertex average to the centre.
  r = 0.03
  octahedron = np.array([(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]) * r
  octahedron_faces = np.array([(a, b, c) for a in (0, 1) for b in (2, 3) for c in (4, 5)])
  assert metrics.roughness(octahedron[None], octahedron_faces)[0] == pytest.approx(r, rel=1e-12)
  # A flat regular grid: every interior vertex sits at the mean of its one-ring.
  side = 9
  verts, faces = _grid_mesh(side, spacing=0.004)
  ring_mean = metrics.one_ring_mean_matrix(faces, len(verts))
  interior = [a * side + b for a in range(1, side - 1) for b in range(1, side - 1)]
  np.testing.assert_allclose((verts - ring_mean @ verts)[interior], 0.0, atol=1e-15)
  # Lifting one vertex (whose ring is all interior) by h adds h for itself and h / 6 for each of
  # its 6 neighbours: 2 h over the V vertices.
  h = 0.001
  lifted = verts.copy()
  lifted[4 * side + 4, 2] += h
  flat, bumped = metrics.roughness(np.stack([verts, lifted]), faces)
  assert bumped - flat == pytest.approx(2 * h / len(verts), rel=1e-9)


def test_roughness_scales_linearly_and_ignores_rigid_motion():
  rng = np.random.default_rng(2)
  faces = np.array([(0, 1, 2), (0, 2, 3), (1, 2, 4), (2, 3, 4), (0, 3, 4), (0, 1, 4)])
  verts = rng.normal(size=(2, 5, 3))
  base = metrics.roughness(verts, faces)
  np.testing.assert_allclose(metrics.roughness(verts * 2.5, faces), 2.5 * base, rtol=1e-12)
  moved = verts @ _random_rotation(rng).T + np.array([0.1, -0.2, 0.3])
  np.testing.assert_allclose(metrics.roughness(moved, faces), base, rtol=1e-12)


def test_roughness_scores_in_millimetres_and_their_ratio():
  side = 6
  verts, faces = _grid_mesh(side, spacing=0.01)
  rng = np.random.default_rng(3)
  gt = np.stack([verts, verts])
  pred = gt + rng.normal(size=gt.shape) * 0.001
  scores = metrics.roughness_scores(pred, gt, faces)
  assert scores['roughness'] == pytest.approx(1000 * metrics.roughness(pred, faces).mean())
  assert scores['roughness_gt'] == pytest.approx(1000 * metrics.roughness(gt, faces).mean())
  assert scores['roughness_ratio'] == pytest.approx(scores['roughness'] / scores['roughness_gt'])
  assert scores['roughness_ratio'] > 1  # noise roughens


@pytest.mark.parametrize('bad', ['shape', 'index', 'float_faces'])
def test_roughness_bad_input_raises(bad):
  verts = np.zeros((1, 4, 3))
  faces = np.array([(0, 1, 2), (0, 2, 3)])
  if bad == 'shape':
    verts = np.zeros((4, 3))
  elif bad == 'index':
    faces = np.array([(0, 1, 4)])
  else:
    faces = faces.astype(np.float64)
  with pytest.raises(ValueError):
    metrics.roughness(verts, faces)
