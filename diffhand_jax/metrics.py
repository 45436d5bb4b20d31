"""FreiHAND evaluation metrics, following the official toolbox's `eval.py` exactly.

Official reference: lmb-freiburg/freihand `eval.py` (`align_w_scale`, `calculate_fscore`, `main`)
and `utils/eval_util.py` (`EvalUtil.get_measures`). What is reproduced, and how:

* Similarity (Procrustes with scale) alignment per sample, joints and vertices aligned
  separately (`align_w_scale(gt, pred)`): centre both sets, divide each by its Frobenius norm
  (+1e-8), orthogonal Procrustes via the SVD of the 3x3 cross-covariance `gt_n^T pred_n`
  (`scipy.linalg.orthogonal_procrustes`: R = U V^T, no determinant fix, so reflections are
  allowed), then `aligned = pred_n @ R^T * s * |gt_c| + mean(gt)` with s = sum of the
  singular values.
* Mean errors: mean Euclidean distance over all samples and points (the official code averages
  per point over samples, then over points; every point is visible in FreiHAND, so that equals
  the plain mean over samples and points).
* AUC of the PCK curve: thresholds `np.linspace(0, 0.05, 100)` metres, PCK = fraction of
  distances `<=` threshold (the official comparison), trapezoidal area divided by the
  trapezoidal area of ones over the same thresholds (= 0.05).
* F-score at 5 mm and 15 mm per sample, averaged over samples: nearest-neighbour distances from
  each predicted vertex to the GT vertices and back, strict `<` threshold, F = 2PR/(P+R), 0 when
  P + R = 0. The unaligned F-scores use the raw prediction, the PA ones the aligned vertices.
* Unaligned errors: no root alignment at all (the caller decides the frame of both inputs).

Inputs are metres; `freihand_metrics` reports millimetres (errors) and fractions (AUC, F).
Everything runs in float64; the alignment is a batched SVD; the F-scores' nearest-neighbour tests
run as one dense pass over the pairs on the device, exact in float64 terms (`nearest.py`;
`benchmarks/metrics.py` times it).
"""

import json
import os

import numpy as np

from diffhand_jax import checks
from diffhand_jax import nearest

NUM_JOINTS = 21
NUM_VERTICES = 778
# Official eval.py: `get_measures(0.0, 0.05, 100)` (metres) and `f_threshs = [0.005, 0.015]`.
PCK_THRESHOLDS_M = np.linspace(0.0, 0.05, 100)
F_THRESHOLDS_M = (0.005, 0.015)
_ALIGN_EPS = 1e-8  # added to the Frobenius norms, as in the official align_w_scale
_M_TO_MM = 1000.0

METRIC_KEYS = (
    'mpjpe',
    'pa_mpjpe',
    'mpvpe',
    'pa_mpvpe',
    'auc_joints',
    'pa_auc_joints',
    'auc_verts',
    'pa_auc_verts',
    'f5',
    'f15',
    'pa_f5',
    'pa_f15',
)
# (scores.txt name, our key, factor from our units): errors mm -> cm, the rest unchanged; the
# order is the order the official eval.py writes.
_SCORES_TXT = (
    ('xyz_mean3d', 'mpjpe', 0.1),
    ('xyz_auc3d', 'auc_joints', 1.0),
    ('xyz_al_mean3d', 'pa_mpjpe', 0.1),
    ('xyz_al_auc3d', 'pa_auc_joints', 1.0),
    ('mesh_mean3d', 'mpvpe', 0.1),
    ('mesh_auc3d', 'auc_verts', 1.0),
    ('mesh_al_mean3d', 'pa_mpvpe', 0.1),
    ('mesh_al_auc3d', 'pa_auc_verts', 1.0),
    ('f_score_5', 'f5', 1.0),
    ('f_al_score_5', 'pa_f5', 1.0),
    ('f_score_15', 'f15', 1.0),
    ('f_al_score_15', 'pa_f15', 1.0),
)


def _check_points(name, x, num_points, num_samples='N'):
  """Returns `x` as float64 after checking shape [num_samples, num_points, 3] and finiteness."""
  return checks.check_array(name, x, (num_samples, num_points, 3), dtype=np.float64)


def _check_predictions(pred_joints, pred_verts, gt_joints, gt_verts):
  """The four arrays checked for shapes [N, 21, 3] / [N, 778, 3] with one N; returns them."""
  pred_joints = _check_points('pred_joints', pred_joints, NUM_JOINTS)
  num_samples = pred_joints.shape[0]
  return (
      pred_joints,
      _check_points('pred_verts', pred_verts, NUM_VERTICES, num_samples),
      _check_points('gt_joints', gt_joints, NUM_JOINTS, num_samples),
      _check_points('gt_verts', gt_verts, NUM_VERTICES, num_samples),
  )


def align_w_scale(gt, pred):
  """Similarity-aligns each predicted point set to its ground truth (official `align_w_scale`).

  Args:
    gt: [samples, points, 3] ground truth.
    pred: [samples, points, 3] prediction.

  Returns:
    [samples, points, 3] float64: the prediction after the per-sample rotation (or reflection),
    scale and translation that best fit it to `gt`.
  """
  gt = checks.check_array('gt', gt, ('samples', 'points', 3), dtype=np.float64, finite=False)
  pred = checks.check_array('pred', pred, gt.shape, dtype=np.float64, finite=False)
  gt_mean = _mean_over_points(gt)
  gt_c = gt - gt_mean
  pred_c = pred - _mean_over_points(pred)
  gt_norm = np.sqrt(np.einsum('spk,spk->s', gt_c, gt_c)) + _ALIGN_EPS
  pred_norm = np.sqrt(np.einsum('spk,spk->s', pred_c, pred_c)) + _ALIGN_EPS
  # orthogonal_procrustes(A=gt_n, B=pred_n) with gt_n = gt_c / gt_norm, pred_n likewise:
  # R = U V^T from svd(A^T B), s = sum of the singular values; R maps gt onto pred, so pred is
  # brought back with R^T. The normalised sets are never formed: their factors are folded into
  # the 3x3 matrices (fewer passes over the [samples, points, 3] arrays).
  cross = np.swapaxes(gt_c, 1, 2) @ pred_c / (gt_norm * pred_norm)[:, None, None]
  u, singular_values, vt = np.linalg.svd(cross)
  factor = singular_values.sum(axis=1) * gt_norm / pred_norm
  aligned = pred_c @ (np.swapaxes(u @ vt, 1, 2) * factor[:, None, None])
  aligned += gt_mean
  return aligned


def _mean_over_points(x):
  """[samples, 1, 3] mean of [samples, points, 3] (einsum: ~4x faster than `mean(axis=1)`)."""
  return np.einsum('spk->sk', x)[:, None] / x.shape[1]


def _point_errors(gt, pred):
  """Euclidean distances [samples, points] between corresponding points."""
  difference = gt - pred
  return np.sqrt(np.einsum('spk,spk->sp', difference, difference))


def _mean_and_auc(errors):
  """Mean error and PCK AUC of distances in metres, as `EvalUtil.get_measures(0, .05, 100)`.

  Args:
    errors: [samples, points] distances in metres.

  Returns:
    (mean error in metres, AUC as a fraction in [0, 1]).
  """
  flat = np.sort(errors.ravel())
  # PCK(th) = fraction of distances <= th; searchsorted(side='right') counts exactly those.
  pck = np.searchsorted(flat, PCK_THRESHOLDS_M, side='right') / flat.size
  auc = np.trapezoid(pck, PCK_THRESHOLDS_M) / np.trapezoid(
      np.ones_like(PCK_THRESHOLDS_M), PCK_THRESHOLDS_M
  )
  return float(errors.mean()), float(auc)


def f_scores(gt_verts, pred_verts, thresholds=F_THRESHOLDS_M):
  """Per-sample F-scores between two vertex sets (official `calculate_fscore`).

  Args:
    gt_verts: [samples, points, 3] metres.
    pred_verts: [samples, points', 3] metres.
    thresholds: distances in metres (strict `<`).

  Returns:
    [len(thresholds), samples] F-scores in [0, 1].
  """
  return _f_scores_of(nearest.closer_than(pred_verts, gt_verts, thresholds))


def _f_scores_of(near):
  """[T, samples] F-scores from `nearest.closer_than(pred, gt, thresholds)`'s answer."""
  pred_near_gt, gt_near_pred = near
  return f_score(np.mean(pred_near_gt, axis=2), np.mean(gt_near_pred, axis=2))


def f_score(precision, recall):
  """2PR / (P + R), elementwise; 0 where P + R = 0 (official `calculate_fscore`)."""
  denominator = precision + recall
  safe = np.where(denominator > 0, denominator, 1.0)
  return np.where(denominator > 0, 2.0 * precision * recall / safe, 0.0)


def freihand_metrics(pred_joints, pred_verts, gt_joints, gt_verts):
  """All official FreiHAND metrics for a set of predictions.

  Args:
    pred_joints: [N, 21, 3] metres.
    pred_verts: [N, 778, 3] metres.
    gt_joints: [N, 21, 3] metres.
    gt_verts: [N, 778, 3] metres.

  Returns:
    dict with the keys of METRIC_KEYS: mpjpe, pa_mpjpe, mpvpe, pa_mpvpe in millimetres;
    auc_joints, pa_auc_joints, auc_verts, pa_auc_verts (0-50 mm) and f5, f15, pa_f5, pa_f15
    as fractions in [0, 1]. All Python floats.
  """
  pred_joints, pred_verts, gt_joints, gt_verts = _check_predictions(
      pred_joints, pred_verts, gt_joints, gt_verts
  )
  if pred_joints.shape[0] == 0:
    raise ValueError('freihand_metrics needs at least one sample, got 0')

  # The F-scores' nearest-neighbour passes run on the device while the host aligns and
  # measures (JAX dispatches asynchronously; `nearest.finish` waits).
  pending = {'': nearest.start(pred_verts, gt_verts, F_THRESHOLDS_M)}
  aligned_joints = align_w_scale(gt_joints, pred_joints)
  aligned_verts = align_w_scale(gt_verts, pred_verts)
  pending['pa_'] = nearest.start(aligned_verts, gt_verts, F_THRESHOLDS_M)
  metrics = {}
  for name, auc_name, gt, pred in (
      ('mpjpe', 'auc_joints', gt_joints, pred_joints),
      ('pa_mpjpe', 'pa_auc_joints', gt_joints, aligned_joints),
      ('mpvpe', 'auc_verts', gt_verts, pred_verts),
      ('pa_mpvpe', 'pa_auc_verts', gt_verts, aligned_verts),
  ):
    mean_error, auc = _mean_and_auc(_point_errors(gt, pred))
    metrics[name] = mean_error * _M_TO_MM
    metrics[auc_name] = auc
  for prefix, started in pending.items():
    scores = _f_scores_of(nearest.finish(started))
    for threshold, per_sample in zip(F_THRESHOLDS_M, scores):
      metrics[f'{prefix}f{round(threshold * _M_TO_MM)}'] = float(per_sample.mean())
  return {key: metrics[key] for key in METRIC_KEYS}


def joint_errors(pred_joints, gt_joints):
  """MPJPE and PA-MPJPE (mm) alone: the same numbers as `freihand_metrics` without the rest.

  Args:
    pred_joints: [N, 21, 3] metres.
    gt_joints: [N, 21, 3] metres.

  Returns:
    {'mpjpe': float, 'pa_mpjpe': float} in millimetres.
  """
  pred_joints = _check_points('pred_joints', pred_joints, NUM_JOINTS)
  gt_joints = _check_points('gt_joints', gt_joints, NUM_JOINTS, pred_joints.shape[0])
  aligned = align_w_scale(gt_joints, pred_joints)
  return {
      'mpjpe': float(_point_errors(gt_joints, pred_joints).mean()) * _M_TO_MM,
      'pa_mpjpe': float(_point_errors(gt_joints, aligned).mean()) * _M_TO_MM,
  }


def per_example_errors(pred_joints, pred_verts, gt_joints, gt_verts):
  """Errors of every example apart (what `freihand_metrics` averages over examples).

  For ranking examples and vertices (oracle choice among hypotheses, uncertainty checks).

  Args:
    pred_joints: [N, 21, 3] metres.
    pred_verts: [N, 778, 3] metres.
    gt_joints: [N, 21, 3] metres.
    gt_verts: [N, 778, 3] metres.

  Returns:
    dict of float64 arrays: 'mpjpe', 'pa_mpjpe', 'mpvpe', 'pa_mpvpe' [N] in millimetres (their
    means are `freihand_metrics`' values) and 'vertex_errors' [N, 778] in metres (unaligned
    distance of every vertex).
  """
  pred_joints, pred_verts, gt_joints, gt_verts = _check_predictions(
      pred_joints, pred_verts, gt_joints, gt_verts
  )
  vertex_errors = _point_errors(gt_verts, pred_verts)
  return {
      'mpjpe': _point_errors(gt_joints, pred_joints).mean(axis=1) * _M_TO_MM,
      'pa_mpjpe': _point_errors(gt_joints, align_w_scale(gt_joints, pred_joints)).mean(axis=1)
      * _M_TO_MM,
      'mpvpe': vertex_errors.mean(axis=1) * _M_TO_MM,
      'pa_mpvpe': _point_errors(gt_verts, align_w_scale(gt_verts, pred_verts)).mean(axis=1)
      * _M_TO_MM,
      'vertex_errors': vertex_errors,
  }


def mean_hand_baseline(gt_joints):
  """Errors of predicting the split's mean root-relative hand for every example (mm).

  The reference a model must beat to show it reads the hand from the image. Inputs are
  root-relative joints in one handedness (the pipeline's right-hand frame).

  Args:
    gt_joints: [N, 21, 3] metres.

  Returns:
    `joint_errors` of the mean hand against gt_joints.
  """
  gt_joints = _check_points('gt_joints', gt_joints, NUM_JOINTS)
  mean = np.broadcast_to(gt_joints.mean(axis=0), gt_joints.shape)
  return joint_errors(mean, gt_joints)


def one_ring_mean_matrix(faces, num_vertices=NUM_VERTICES):
  """[V, V] float64 matrix M with (M @ verts)[v] = mean of the one-ring neighbours of v.

  Neighbours are the vertices that share an edge of a triangle of `faces` with v (each
  counted once, whatever the number of triangles that share the edge). A vertex without
  neighbours has an all-zero row.

  Args:
    faces: [F, 3] vertex ids in [0, num_vertices).
    num_vertices: V.
  """
  faces = np.asarray(faces)
  if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
    raise ValueError(f'faces must be an integer array [F, 3], got {faces.dtype} {faces.shape}')
  if faces.size and (faces.min() < 0 or faces.max() >= num_vertices):
    raise ValueError(f'faces index vertices outside [0, {num_vertices})')
  adjacency = np.zeros((num_vertices, num_vertices), np.float64)
  for a, b in ((0, 1), (1, 2), (2, 0)):
    adjacency[faces[:, a], faces[:, b]] = 1.0
    adjacency[faces[:, b], faces[:, a]] = 1.0
  np.fill_diagonal(adjacency, 0.0)  # a degenerate triangle does not make v its own neighbour
  degree = adjacency.sum(axis=1, keepdims=True)
  return adjacency / np.where(degree > 0, degree, 1.0)


def roughness(verts, faces):
  """Per-mesh roughness: the mean over vertices of |v - mean of v's one-ring neighbours|.

  The length of the uniform (umbrella) Laplacian, averaged over the vertices that have
  neighbours; 0 for a flat regular grid's interior, and it scales linearly with the mesh. In the
  units of `verts` (translation- and rotation-invariant).

  Args:
    verts: [N, V, 3] vertices (e.g. metres).
    faces: [F, 3] triangle vertex ids shared by the N meshes.

  Returns:
    [N] float64.
  """
  verts = checks.check_array('verts', np.asarray(verts, np.float64), ('N', 'V', 3))
  num_meshes, num_vertices, _ = verts.shape
  ring_mean = one_ring_mean_matrix(faces, num_vertices)
  has_ring = ring_mean.sum(axis=1) > 0
  if not has_ring.any():
    raise ValueError('roughness needs faces that connect at least two vertices')
  # One matrix product for all meshes: [V, V] @ [V, N * 3].
  stacked = np.moveaxis(verts, 1, 0).reshape(num_vertices, num_meshes * 3)
  laplacian = (stacked - ring_mean @ stacked).reshape(num_vertices, num_meshes, 3)
  lengths = np.sqrt(np.einsum('vnk,vnk->nv', laplacian, laplacian))  # [N, V]
  return lengths[:, has_ring].mean(axis=1)


def roughness_scores(pred_verts, gt_verts, faces):
  """metrics.json's roughness entries (millimetres) for [N, V, 3] meshes in metres.

  Returns:
    {'roughness': mean predicted roughness, 'roughness_gt': the same of the ground truth,
    'roughness_ratio': their ratio (1 = as smooth as the truth; above 1 = rougher)}.
  """
  predicted = float(np.mean(roughness(pred_verts, faces))) * _M_TO_MM
  truth = float(np.mean(roughness(gt_verts, faces))) * _M_TO_MM
  return {
      'roughness': predicted,
      'roughness_gt': truth,
      'roughness_ratio': predicted / truth if truth > 0 else float('nan'),
  }


def write_pred_json(path, xyz, verts):
  """Writes the official submission file `[xyz_list, verts_list]` (metres, evaluation order).

  Args:
    path: output file, e.g. '<dir>/pred.json'; parent folders are created.
    xyz: [N, 21, 3] predicted joints, metres.
    verts: [N, 778, 3] predicted vertices, metres.
  """
  xyz = _check_points('xyz', xyz, NUM_JOINTS)
  verts = _check_points('verts', verts, NUM_VERTICES, xyz.shape[0])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump([xyz.tolist(), verts.tolist()], f)


def write_scores_txt(path, metrics):
  """Writes `metrics` in the official `scores.txt` format (errors in centimetres).

  Args:
    path: output file; parent folders are created.
    metrics: a dict from `freihand_metrics` (millimetres / fractions).
  """
  missing = [key for _, key, _ in _SCORES_TXT if key not in metrics]
  if missing:
    raise ValueError(f'metrics lack the keys {missing} needed for scores.txt')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    for official_name, key, factor in _SCORES_TXT:
      f.write('%s: %f\n' % (official_name, float(metrics[key]) * factor))


def format_table(metrics):
  """A console table of the metrics (millimetres for errors, fractions otherwise).

  Args:
    metrics: a dict from `freihand_metrics`; unknown keys are listed after the known ones.

  Returns:
    A multi-line string.
  """
  rows = [('', 'joints', 'PA joints', 'verts', 'PA verts')]
  rows.append(
      ('error (mm)',)
      + tuple(_fmt(metrics.get(k), 2) for k in ('mpjpe', 'pa_mpjpe', 'mpvpe', 'pa_mpvpe'))
  )
  rows.append(
      ('AUC 0-50 mm',)
      + tuple(
          _fmt(metrics.get(k), 3)
          for k in ('auc_joints', 'pa_auc_joints', 'auc_verts', 'pa_auc_verts')
      )
  )
  rows.append(('F@5 mm', '', '', _fmt(metrics.get('f5'), 3), _fmt(metrics.get('pa_f5'), 3)))
  rows.append(('F@15 mm', '', '', _fmt(metrics.get('f15'), 3), _fmt(metrics.get('pa_f15'), 3)))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = [
      '  '.join(
          cell.rjust(width) if i else cell.ljust(width)
          for i, (cell, width) in enumerate(zip(row, widths))
      )
      for row in rows
  ]
  lines += [f'{key}: {_fmt(value, 4)}' for key, value in metrics.items() if key not in METRIC_KEYS]
  return '\n'.join(lines)


def _fmt(value, digits):
  """Formats a number for `format_table`; '-' when absent."""
  if value is None:
    return '-'
  if isinstance(value, (int, np.integer)):  # counts such as num_examples
    return str(value)
  if not isinstance(value, (float, np.floating)):
    return str(value)
  return f'{float(value):.{digits}f}'
