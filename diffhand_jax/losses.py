"""DiffHand training losses (DESIGN.md §5), pure jittable JAX functions.

Definitions used throughout. For point sets a, b of shape [B, P, D] and per-example weights
w [B] (the batch's `valid`: 1 = real example, 0 = padding):

  mean ||a - b||^2 = sum_b w_b * (1/P) sum_p ||a_bp - b_bp||_2^2 / sum_b w_b,

i.e. the squared Euclidean norm over the last (coordinate) axis, averaged over points and then
over the valid examples; padding examples contribute nothing, and an all-padding batch gives 0.

Every 3D term is measured in the diffusion space (root-relative metres / vertex_scale), so the
terms have comparable sizes. With x̂0 the network's output, Ĵ = R x̂0 (R the [21, N] joint
regressor) and J = joints3d / vertex_scale:
  L_x0  = mean ||x̂0 - x0||^2   (a vertex loss on V̂ = x̂0 would be the same term again)
  L_J   = mean ||Ĵ - J||^2
  L_2D  = mean ||s (vertex_scale Ĵ)_xy + t - j2d||^2  (weak-perspective camera (s, tx, ty) in
          [-1, 1] crop units per metre; not a 3D term, it has its own weight)
  L_n   = mean over faces f and their 3 edges e of |<ê, n_f>|  (ê the unit predicted edge,
          n_f the unit ground-truth face normal)
  L_aux = mean ||Ĵ_aux - J||^2  (the auxiliary head's joints, from the image embedding alone)
  total = x0_weight L_x0 + joints_weight L_J + reprojection_weight L_2D
          + normal_weight L_n + aux_weight L_aux.
The direct-regression ablation (diffusion=False) uses the same terms (DESIGN §3).
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
      want is not None and got != want for got, want in zip(x.shape, shape)
  ):
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
  return _weighted_batch_mean(per_example_squared_error(pred, target), valid)


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
      jnp.maximum(jnp.sum(jnp.square(vectors), axis=-1, keepdims=True), _EDGE_EPS_SQ)
  )


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


def laplacian_loss(pred_verts, gt_verts, faces, valid):
  """L_lap = mean over vertices of ||L(pred) - L(gt)||^2 (L: `mesh.umbrella_laplacian`).

  A surface term: the predicted mesh must have the true mesh's local shape, which the
  per-vertex L_x0 leaves to chance (each vertex's error can differ from its neighbours').

  Args:
    pred_verts: [B, N, 3] predicted vertices.
    gt_verts: [B, N, 3] ground truth (same units).
    faces: [F, 3] integer vertex ids (static numpy array).
    valid: [B] example weights.

  Returns:
    scalar.
  """
  laplacian = lambda verts: mesh.umbrella_laplacian(verts, faces)
  difference = laplacian(pred_verts) - laplacian(gt_verts)
  return _weighted_batch_mean(jnp.mean(jnp.sum(jnp.square(difference), -1), -1), valid)


LOSS_WEIGHTS = ('x0_weight', 'joints_weight', 'reprojection_weight', 'normal_weight', 'aux_weight')
# Optional weights (0 when a config predates them).
OPTIONAL_LOSS_WEIGHTS = ('laplacian_weight',)


def _weight(weights, name):
  """A loss weight from a ConfigDict or a plain dict."""
  try:
    return float(weights[name])
  except KeyError:
    raise ValueError(f'loss weights lack {name!r} (expected {", ".join(LOSS_WEIGHTS)})') from None


def per_example_squared_error(pred, target):
  """(1/P) sum_p ||pred_bp - target_bp||^2 for each example: [B, P, D] x2 -> [B]."""
  return jnp.mean(jnp.sum(jnp.square(pred - target), axis=-1), axis=-1)


def compute_losses(outputs, batch, *, regressor, faces, vertex_scale, weights):
  """All DESIGN §5 losses of one forward pass and their weighted total.

  Args:
    outputs: the model's training outputs: 'x0' [B, N, 3] (diffusion space), 'camera' [B, 3]
      (s, tx, ty), optionally 'aux_joints' [B, 21, 3] (diffusion space).
    batch: dict with 'verts' [B, N, 3], 'joints3d' [B, 21, 3] (root-relative metres),
      'joints2d' [B, 21, 2] (normalised crop coordinates) and optionally 'valid' [B]
      (example weights; all ones when absent).
    regressor: [21, N] joint regressor (joints = regressor @ vertices).
    faces: [F, 3] integer mesh faces.
    vertex_scale: metres per diffusion unit.
    weights: mapping with the LOSS_WEIGHTS keys (config.loss).

  Returns:
    (total scalar, dict of the unweighted terms 'loss_x0', 'loss_joints', 'loss_2d',
    'loss_normal', with 'aux_joints' 'loss_aux', and with a laplacian_weight > 0
    'loss_laplacian').
  """
  pred_x0 = outputs['x0'].astype(jnp.float32)
  camera = outputs['camera'].astype(jnp.float32)
  batch_size, num_points = pred_x0.shape[0], pred_x0.shape[1]
  num_joints = regressor.shape[0]
  _check_shape('x0', pred_x0, (batch_size, num_points, 3))
  _check_shape('camera', camera, (batch_size, 3))
  _check_shape('regressor', regressor, (num_joints, num_points))
  for key, shape in (
      ('verts', (batch_size, num_points, 3)),
      ('joints3d', (batch_size, num_joints, 3)),
      ('joints2d', (batch_size, num_joints, 2)),
  ):
    if key not in batch:
      raise ValueError(f'batch lacks {key!r}')
    _check_shape(f'batch[{key!r}]', batch[key], shape)
  valid = batch.get('valid')
  if valid is None:
    valid = jnp.ones((batch_size,), jnp.float32)
  _check_shape("batch['valid']", valid, (batch_size,))
  faces = np.asarray(faces)
  _check_shape('faces', faces, (None, 3))
  weight = {name: _weight(weights, name) for name in LOSS_WEIGHTS}
  weight.update({name: float(weights.get(name, 0.0)) for name in OPTIONAL_LOSS_WEIGHTS})

  x0_target = batch['verts'] / vertex_scale
  joints_target = batch['joints3d'] / vertex_scale
  pred_joints = jnp.einsum('jn,bnd->bjd', regressor, pred_x0)
  terms = {
      'loss_x0': mean_squared_error(pred_x0, x0_target, valid),
      'loss_joints': mean_squared_error(pred_joints, joints_target, valid),
      'loss_2d': reprojection_loss(pred_joints * vertex_scale, camera, batch['joints2d'], valid),
      'loss_normal': normal_consistency_loss(pred_x0, x0_target, faces, valid),
  }
  if 'aux_joints' in outputs:
    aux = outputs['aux_joints'].astype(jnp.float32)
    _check_shape('aux_joints', aux, (batch_size, num_joints, 3))
    terms['loss_aux'] = mean_squared_error(aux, joints_target, valid)
  total = (
      weight['x0_weight'] * terms['loss_x0']
      + weight['joints_weight'] * terms['loss_joints']
      + weight['reprojection_weight'] * terms['loss_2d']
      + weight['normal_weight'] * terms['loss_normal']
  )
  if 'loss_aux' in terms:
    total = total + weight['aux_weight'] * terms['loss_aux']
  if weight['laplacian_weight'] > 0:  # off: the step is exactly the one without the term
    terms['loss_laplacian'] = laplacian_loss(pred_x0, x0_target, faces, valid)
    total = total + weight['laplacian_weight'] * terms['loss_laplacian']
  return total, terms
