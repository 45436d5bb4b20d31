"""DiffHand training losses (DESIGN.md §5), pure jittable JAX functions.

Definitions used throughout. For point sets a, b of shape [B, P, D] and per-example weights
w [B] (the batch's `valid`: 1 = real example, 0 = padding):

  mean ||a - b||^2 = sum_b w_b * (1/P) sum_p ||a_bp - b_bp||_2^2 / sum_b w_b,

i.e. the squared Euclidean norm over the last (coordinate) axis, averaged over points and then
over the valid examples; padding examples contribute nothing, and an all-padding batch gives 0.

With V̂ = x̂0 · vertex_scale (root-relative metres: the targets are root-relative, so no root
is added) and Ĵ = R V̂ (R the [21, N] joint regressor):
  L_x0 = mean ||x̂0 - x0||^2           (diffusion space; only with diffusion)
  L_V  = mean ||V̂ - V||^2             (metres^2)
  L_J  = mean ||Ĵ - J||^2             (metres^2)
  L_2D = mean ||s Ĵ_xy + t - j2d||^2   (weak-perspective camera (s, tx, ty); [-1, 1] crop units)
  L_n  = mean over faces f and their 3 edges e of |<ê, n_f>|  (ê the unit predicted edge, n_f
         the unit ground-truth face normal; averaged over the valid examples like the others)
  total = x0_weight L_x0 + mesh_weight (L_V + L_J + L_2D) + normal_weight L_n.
"""
import jax
import jax.numpy as jnp
import numpy as np

from diffhand_jax import mesh

# Floor on squared edge lengths: keeps the unit edge (and its gradient) finite for collapsed
# edges, which a freshly initialised decoder can produce.
_EDGE_EPS_SQ = 1e-24


def _check_shape(name, x, shape):
  """Raises ValueError unless x.shape matches `shape` (None = any size)."""
  if len(x.shape) != len(shape) or any(
      want is not None and got != want for got, want in zip(x.shape, shape)):
    want = tuple('?' if s is None else s for s in shape)
    raise ValueError(f'{name} must have shape {want}, got {tuple(x.shape)}')


def _weighted_batch_mean(per_example, valid):
  """Mean of per-example values [B] weighted by `valid` [B]; 0 when no example is valid."""
  valid = valid.astype(per_example.dtype)
  return jnp.sum(per_example * valid) / jnp.maximum(jnp.sum(valid), 1e-12)


def mean_squared_error(pred, target, valid):
  """mean ||pred - target||^2 over valid examples and points (see the module docstring).

  Args:
    pred: [B, P, D].
    target: [B, P, D].
    valid: [B] example weights.

  Returns:
    scalar.
  """
  per_example = jnp.mean(jnp.sum(jnp.square(pred - target), axis=-1), axis=-1)
  return _weighted_batch_mean(per_example, valid)


def project_weak_perspective(points, camera):
  """Weak-perspective projection Π(X) = s X[..., :2] + (tx, ty).

  Args:
    points: [B, P, 3] root-relative, metres.
    camera: [B, 3] (s, tx, ty).

  Returns:
    [B, P, 2] normalised crop coordinates ([-1, 1] across the crop).
  """
  return camera[:, None, :1] * points[..., :2] + camera[:, None, 1:]


def reprojection_loss(joints, camera, joints2d, valid):
  """L_2D = mean ||Π(Ĵ; ĉ) - j2d||^2.

  Args:
    joints: [B, J, 3] predicted joints, root-relative metres.
    camera: [B, 3] predicted (s, tx, ty).
    joints2d: [B, J, 2] target joints in normalised crop coordinates.
    valid: [B] example weights.

  Returns:
    scalar.
  """
  return mean_squared_error(project_weak_perspective(joints, camera), joints2d, valid)


def _unit(vectors):
  """Unit vectors along the last axis; the floor keeps zero-length ones (and grads) finite."""
  return vectors * jax.lax.rsqrt(
      jnp.maximum(jnp.sum(jnp.square(vectors), axis=-1, keepdims=True), _EDGE_EPS_SQ))


def normal_consistency_loss(pred_verts, gt_verts, faces, valid):
  """L_n = mean over faces and their 3 edges of |<unit predicted edge, unit GT face normal>|.

  Args:
    pred_verts: [B, N, 3] predicted vertices.
    gt_verts: [B, N, 3] ground-truth vertices.
    faces: [F, 3] integer vertex ids (static numpy array).
    valid: [B] example weights.

  Returns:
    scalar in [0, 1].
  """
  normals = jax.lax.stop_gradient(mesh.face_normals(gt_verts, faces))  # [B, F, 3]
  corners = pred_verts[:, faces, :]  # [B, F, 3 corners, 3]
  # The three edges v0->v1, v1->v2, v2->v0 of each face.
  edges = _unit(jnp.roll(corners, -1, axis=2) - corners)
  cosines = jnp.abs(jnp.sum(edges * normals[:, :, None, :], axis=-1))  # [B, F, 3]
  return _weighted_batch_mean(jnp.mean(cosines, axis=(1, 2)), valid)


def _weight(weights, name):
  """A loss weight from a ConfigDict or a plain dict."""
  try:
    return float(weights[name])
  except KeyError:
    raise ValueError(f'loss weights lack {name!r} (expected x0_weight, mesh_weight, '
                     'normal_weight)') from None


def compute_losses(pred_x0, camera, batch, *, x0_target, regressor, faces, vertex_scale,
                   weights, use_x0_loss):
  """All DESIGN §5 losses of one forward pass and their weighted total.

  Args:
    pred_x0: [B, N, 3] the network's x̂0 (diffusion space: root-relative metres / scale).
    camera: [B, 3] predicted weak-perspective camera (s, tx, ty).
    batch: dict with 'verts' [B, N, 3], 'joints3d' [B, 21, 3] (root-relative metres),
      'joints2d' [B, 21, 2] (normalised crop coordinates) and optionally 'valid' [B]
      (example weights; all ones when absent).
    x0_target: [B, N, 3] the clean x0 (batch['verts'] / vertex_scale).
    regressor: [21, N] joint regressor (joints = regressor @ vertices).
    faces: [F, 3] integer mesh faces.
    vertex_scale: metres per diffusion unit.
    weights: mapping with x0_weight, mesh_weight, normal_weight (config.loss).
    use_x0_loss: False for the direct-regression ablation: L_x0 is omitted.

  Returns:
    (total scalar, dict of the unweighted terms: 'loss_x0' (only with use_x0_loss),
    'loss_vertices', 'loss_joints', 'loss_2d', 'loss_normal').
  """
  batch_size, num_points = pred_x0.shape[0], pred_x0.shape[1]
  num_joints = regressor.shape[0]
  _check_shape('pred_x0', pred_x0, (batch_size, num_points, 3))
  _check_shape('camera', camera, (batch_size, 3))
  _check_shape('x0_target', x0_target, (batch_size, num_points, 3))
  _check_shape('regressor', regressor, (num_joints, num_points))
  for key, shape in (('verts', (batch_size, num_points, 3)),
                     ('joints3d', (batch_size, num_joints, 3)),
                     ('joints2d', (batch_size, num_joints, 2))):
    if key not in batch:
      raise ValueError(f'batch lacks {key!r}')
    _check_shape(f'batch[{key!r}]', batch[key], shape)
  valid = batch.get('valid')
  if valid is None:
    valid = jnp.ones((batch_size,), jnp.float32)
  _check_shape("batch['valid']", valid, (batch_size,))
  faces = np.asarray(faces)
  _check_shape('faces', faces, (None, 3))
  mesh_weight = _weight(weights, 'mesh_weight')
  normal_weight = _weight(weights, 'normal_weight')
  x0_weight = _weight(weights, 'x0_weight') if use_x0_loss else 0.0

  pred_verts = pred_x0 * vertex_scale
  pred_joints = jnp.einsum('jn,bnd->bjd', regressor, pred_verts)
  terms = {}
  if use_x0_loss:
    terms['loss_x0'] = mean_squared_error(pred_x0, x0_target, valid)
  terms['loss_vertices'] = mean_squared_error(pred_verts, batch['verts'], valid)
  terms['loss_joints'] = mean_squared_error(pred_joints, batch['joints3d'], valid)
  terms['loss_2d'] = reprojection_loss(pred_joints, camera, batch['joints2d'], valid)
  terms['loss_normal'] = normal_consistency_loss(pred_verts, batch['verts'], faces, valid)

  total = (mesh_weight * (terms['loss_vertices'] + terms['loss_joints'] + terms['loss_2d'])
           + normal_weight * terms['loss_normal'])
  if use_x0_loss:
    total = total + x0_weight * terms['loss_x0']
  return total, terms
