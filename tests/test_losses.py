"""Tests for diffhand_jax/losses.py against naive numpy loops and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax import losses
from diffhand_jax import mesh

_WEIGHTS = {
    'x0_weight': 1.5,
    'joints_weight': 0.7,
    'reprojection_weight': 0.3,
    'normal_weight': 0.05,
    'aux_weight': 0.9,
}
_SCALE = 0.1


def _toy_problem(rng, batch=3, num_points=12, num_joints=5):
  """A random small mesh problem (closed strip of triangles over `num_points` vertices)."""
  faces = np.array(
      [[i, (i + 1) % num_points, (i + 2) % num_points] for i in range(num_points)], np.int32
  )
  verts = rng.normal(size=(batch, num_points, 3)).astype(np.float32) * 0.05
  regressor = rng.uniform(size=(num_joints, num_points)).astype(np.float32)
  regressor /= regressor.sum(1, keepdims=True)
  batch_dict = {
      'verts': verts,
      'joints3d': np.einsum('jn,bnd->bjd', regressor, verts)
      + rng.normal(size=(batch, num_joints, 3)).astype(np.float32) * 0.01,
      'joints2d': rng.uniform(-1, 1, size=(batch, num_joints, 2)).astype(np.float32),
      'valid': np.ones((batch,), np.float32),
  }
  pred_x0 = (verts / _SCALE + rng.normal(size=verts.shape) * 0.3).astype(np.float32)
  camera = np.stack(
      [rng.uniform(5, 10, batch), rng.uniform(-0.2, 0.2, batch), rng.uniform(-0.2, 0.2, batch)], -1
  ).astype(np.float32)
  return pred_x0, camera, batch_dict, regressor, faces


def _loss_fn(regressor, faces, weights=None):
  """compute_losses as a jitted (pred_x0, camera, batch, aux) -> (total, terms); jit for speed.
  `weights` default to _WEIGHTS."""

  def loss(pred_x0, camera, batch, aux_joints=None):
    outputs = {'x0': pred_x0, 'camera': camera}
    if aux_joints is not None:
      outputs['aux_joints'] = aux_joints
    return losses.compute_losses(
        outputs,
        batch,
        regressor=jnp.asarray(regressor),
        faces=faces,
        vertex_scale=_SCALE,
        weights=_WEIGHTS if weights is None else weights,
    )

  return jax.jit(loss)


def _loss(pred_x0, camera, batch, regressor, faces, aux_joints=None):
  return _loss_fn(regressor, faces)(pred_x0, camera, batch, aux_joints)


def _naive_mse(a, b, valid):
  """sum_b w_b (1/P) sum_p sum_d (a - b)^2 / sum_b w_b, with explicit loops."""
  total, weight = 0.0, 0.0
  for i in range(a.shape[0]):
    per_point = 0.0
    for p in range(a.shape[1]):
      per_point += sum((float(a[i, p, d]) - float(b[i, p, d])) ** 2 for d in range(a.shape[2]))
    total += valid[i] * per_point / a.shape[1]
    weight += valid[i]
  return total / weight


def _naive_normal_loss(pred, gt, faces, valid):
  total, weight = 0.0, 0.0
  for i in range(pred.shape[0]):
    acc = 0.0
    for f in faces:
      g0, g1, g2 = (gt[i, k].astype(np.float64) for k in f)
      normal = np.cross(g1 - g0, g2 - g0)
      normal /= np.linalg.norm(normal)
      for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0])):
        edge = pred[i, b].astype(np.float64) - pred[i, a]
        acc += abs(np.dot(edge / np.linalg.norm(edge), normal))
    total += valid[i] * acc / (3 * len(faces))
    weight += valid[i]
  return total / weight


def test_terms_match_naive_loops():
  pred_x0, camera, batch, regressor, faces = _toy_problem(np.random.default_rng(0))
  batch['valid'] = np.array([1.0, 0.0, 1.0], np.float32)
  aux = np.random.default_rng(10).normal(size=batch['joints3d'].shape).astype(np.float32)
  total, terms = _loss(pred_x0, camera, batch, regressor, faces, aux)
  valid = batch['valid']
  pred_v = pred_x0.astype(np.float64) * _SCALE
  pred_j = np.einsum('jn,bnd->bjd', regressor.astype(np.float64), pred_v)
  projected = np.empty(pred_j.shape[:2] + (2,))
  for i in range(pred_j.shape[0]):
    for j in range(pred_j.shape[1]):
      s, tx, ty = camera[i]
      projected[i, j] = (s * pred_j[i, j, 0] + tx, s * pred_j[i, j, 1] + ty)
  # Every 3D term in diffusion units (metres / scale); L_2D in crop units.
  expected = {
      'loss_x0': _naive_mse(pred_x0, batch['verts'] / _SCALE, valid),
      'loss_joints': _naive_mse(pred_j / _SCALE, batch['joints3d'] / _SCALE, valid),
      'loss_2d': _naive_mse(projected, batch['joints2d'], valid),
      'loss_normal': _naive_normal_loss(pred_v, batch['verts'], faces, valid),
      'loss_aux': _naive_mse(aux, batch['joints3d'] / _SCALE, valid),
  }
  assert set(terms) == set(expected)
  for key, value in expected.items():
    assert float(terms[key]) == pytest.approx(value, rel=1e-4), key
  expected_total = (
      1.5 * expected['loss_x0']
      + 0.7 * expected['loss_joints']
      + 0.3 * expected['loss_2d']
      + 0.05 * expected['loss_normal']
      + 0.9 * expected['loss_aux']
  )
  assert float(total) == pytest.approx(expected_total, rel=1e-4)


def test_aux_term_only_with_the_head():
  pred_x0, camera, batch, regressor, faces = _toy_problem(np.random.default_rng(1))
  aux = np.zeros_like(batch['joints3d'])
  total_with, terms_with = _loss(pred_x0, camera, batch, regressor, faces, aux)
  total_without, terms_without = _loss(pred_x0, camera, batch, regressor, faces)
  assert 'loss_aux' not in terms_without
  # Zero joints against the targets: L_aux = mean |J|^2 / scale^2.
  expected_aux = np.mean(np.sum(np.square(batch['joints3d'] / _SCALE), -1))
  assert float(terms_with['loss_aux']) == pytest.approx(expected_aux, rel=1e-5)
  assert float(total_with - total_without) == pytest.approx(0.9 * expected_aux, rel=1e-4)


def test_padding_contributes_nothing():
  rng = np.random.default_rng(2)
  pred_x0, camera, batch, regressor, faces = _toy_problem(rng, batch=2)
  _, terms_ref = _loss(pred_x0, camera, batch, regressor, faces)
  # Append a padding example full of large garbage values.
  padded = {
      k: np.concatenate([v, 100 + 50 * rng.normal(size=(1,) + v.shape[1:]).astype(v.dtype)])
      for k, v in batch.items()
      if k != 'valid'
  }
  padded['valid'] = np.array([1.0, 1.0, 0.0], np.float32)
  pred_pad = np.concatenate([pred_x0, np.full((1,) + pred_x0.shape[1:], 1e3, np.float32)])
  camera_pad = np.concatenate([camera, [[50.0, 3.0, -3.0]]]).astype(np.float32)
  _, terms_pad = _loss(pred_pad, camera_pad, padded, regressor, faces)
  for key in terms_ref:
    assert float(terms_pad[key]) == pytest.approx(float(terms_ref[key]), rel=1e-5), key
  # All padding: every term is 0, not NaN.
  padded['valid'] = np.zeros(3, np.float32)
  total, terms = _loss(pred_pad, camera_pad, padded, regressor, faces)
  assert float(total) == 0.0 and all(float(v) == 0.0 for v in terms.values())


def _hinged_squares(theta):
  """Two unit right triangles sharing the edge v1-v2, the second folded by `theta` about it.

  Returns (flat ground truth [1, 4, 3], folded prediction [1, 4, 3], faces [2, 3]).
  """
  gt = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], np.float64)
  faces = np.array([[0, 1, 2], [1, 3, 2]], np.int32)
  hinge = (gt[2] - gt[1]) / np.sqrt(2)
  out_dir = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)  # in-plane, perpendicular to the hinge
  folded = gt.copy()
  # v3 - v1 = hinge / sqrt(2) + out_dir / sqrt(2); rotate the perpendicular part by theta.
  folded[3] = gt[1] + (
      hinge + np.cos(theta) * out_dir + np.sin(theta) * np.array([0, 0, 1.0])
  ) / np.sqrt(2)
  return gt[None], folded[None], faces


@pytest.mark.parametrize('theta_deg', [0.0, 30.0, 90.0, 150.0])
def test_normal_consistency_folded_pair_closed_form(theta_deg):
  theta = np.deg2rad(theta_deg)
  gt, folded, faces = _hinged_squares(theta)
  np.testing.assert_allclose(np.linalg.norm(folded[0, 3] - folded[0, 1]), 1.0, atol=1e-12)
  # The two non-hinge edges of the folded face leave the plane by |sin(theta)| / sqrt(2) each;
  # the other 4 of the 6 edges stay in it: mean = 2 sin(theta) / sqrt(2) / 6.
  expected = np.sin(theta) * np.sqrt(2) / 6
  value = jax.jit(
      lambda pred, target: losses.normal_consistency_loss(pred, target, faces, jnp.ones((1,)))
  )(folded.astype(np.float32), gt.astype(np.float32))
  assert float(value) == pytest.approx(expected, abs=1e-6)


def test_normal_consistency_is_zero_for_exact_and_scaled_prediction():
  pred_x0, _, batch, _, faces = _toy_problem(np.random.default_rng(3))
  del pred_x0
  verts = jnp.asarray(batch['verts'])
  loss = jax.jit(
      lambda pred: losses.normal_consistency_loss(pred, verts, faces, jnp.ones((verts.shape[0],)))
  )
  assert float(loss(verts)) < 1e-6
  # Edges of a uniformly scaled and shifted copy are still perpendicular to the GT normals.
  assert float(loss(3 * verts + 1)) < 1e-6


def test_gradients_finite_for_collapsed_prediction_and_jit():
  _, camera, batch, regressor, faces = _toy_problem(np.random.default_rng(4))
  zeros = jnp.zeros(batch['verts'].shape, jnp.float32)  # every edge has length 0
  loss_fn = _loss_fn(regressor, faces)
  grads = jax.jit(jax.grad(lambda x: loss_fn(x, camera, batch)[0]))(zeros)
  assert np.all(np.isfinite(np.asarray(grads)))
  total, _ = loss_fn(zeros, jnp.asarray(camera), batch)
  assert np.isfinite(float(total))


def test_gradient_matches_finite_differences():
  pred_x0, camera, batch, regressor, faces = _toy_problem(np.random.default_rng(5), batch=2)
  pred_x0 = jnp.asarray(pred_x0, jnp.float32)
  loss_fn = _loss_fn(regressor, faces)
  f = lambda x: loss_fn(x, camera, batch)[0]
  grad = np.asarray(jax.jit(jax.grad(f))(pred_x0))
  direction = np.random.default_rng(6).normal(size=pred_x0.shape).astype(np.float32)
  eps = 1e-2
  numeric = (float(f(pred_x0 + eps * direction)) - float(f(pred_x0 - eps * direction))) / (2 * eps)
  assert np.sum(grad * direction) == pytest.approx(numeric, rel=2e-2)


@pytest.mark.parametrize('bad', ['pred', 'camera', 'joints2d', 'valid', 'missing'])
def test_bad_shapes_raise(bad):
  pred_x0, camera, batch, regressor, faces = _toy_problem(np.random.default_rng(7))
  if bad == 'pred':
    pred_x0 = pred_x0[..., :2]
  elif bad == 'camera':
    camera = camera[:, :2]
  elif bad == 'joints2d':
    batch['joints2d'] = batch['joints2d'][:, :3]
  elif bad == 'valid':
    batch['valid'] = batch['valid'][:2]
  else:
    del batch['joints3d']
  with pytest.raises(ValueError, match=r'x0|camera|joints2d|valid|joints3d'):
    _loss(pred_x0, camera, batch, regressor, faces)


def test_missing_weight_raises():
  pred_x0, camera, batch, regressor, faces = _toy_problem(np.random.default_rng(8))
  with pytest.raises(ValueError, match='normal_weight'):
    losses.compute_losses(
        {'x0': jnp.asarray(pred_x0), 'camera': jnp.asarray(camera)},
        batch,
        regressor=regressor,
        faces=faces,
        vertex_scale=_SCALE,
        weights={
            'x0_weight': 1.0,
            'joints_weight': 1.0,
            'reprojection_weight': 1.0,
            'aux_weight': 1.0,
        },
    )


def _naive_laplacian(verts, faces):
  """v - mean of its distinct edge neighbours, by a loop over vertices (float64)."""
  out = np.zeros_like(verts, np.float64)
  for v in range(verts.shape[1]):
    ring = {int(u) for face in faces if v in face for u in face if u != v}
    if ring:
      out[:, v] = verts[:, v] - verts[:, sorted(ring)].mean(axis=1)
    else:
      out[:, v] = verts[:, v]
  return out


def test_laplacian_matches_a_loop_and_the_metric():
  pred_x0, _, batch, _, faces = _toy_problem(np.random.default_rng(5), num_points=9)
  faces = np.concatenate([faces, [[0, 4, 7]]])  # an irregular extra triangle
  got = np.asarray(mesh.umbrella_laplacian(jnp.asarray(pred_x0), faces))
  np.testing.assert_allclose(got, _naive_laplacian(pred_x0, faces), atol=1e-6)
  gt = batch['verts'] / _SCALE
  want = np.mean(np.sum((_naive_laplacian(pred_x0, faces) - _naive_laplacian(gt, faces)) ** 2, -1))
  got = losses.laplacian_loss(pred_x0, gt, faces, jnp.ones(gt.shape[0]))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  shifted = losses.laplacian_loss(gt + 3.0, gt, faces, jnp.ones(gt.shape[0]))
  assert float(shifted) < 1e-10  # a translated mesh has the same local shape


def test_laplacian_term_only_with_a_positive_weight():
  pred_x0, camera, batch, regressor, faces = _toy_problem(np.random.default_rng(6))
  _, terms = _loss(pred_x0, camera, batch, regressor, faces)
  assert 'loss_laplacian' not in terms
  weights = dict(_WEIGHTS, laplacian_weight=2.0)
  total, terms = _loss_fn(regressor, faces, weights)(pred_x0, camera, batch)
  base, _ = _loss(pred_x0, camera, batch, regressor, faces)
  np.testing.assert_allclose(
      float(total), float(base) + 2.0 * float(terms['loss_laplacian']), rtol=1e-5
  )
  assert float(terms['loss_laplacian']) > 0
