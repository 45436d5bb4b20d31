"""The MANO hand layer: model container, file I/O without chumpy, and the LBS forward pass.

`ManoModel` holds the arrays of a MANO right hand (real `MANO_RIGHT.pkl` or the procedural
default of `procedural_mano.py`, whose `load_hand_model(config)` picks between the two).
`mano_forward` is standard MANO/SMPL linear blend skinning in pure JAX; it returns vertices and
21 joints in FreiHAND order, built the way FreiHAND builds them: `J_regressor @ posed
vertices` for the 16 skeleton joints plus five fingertip vertices.

Reading the official pickles: they are Python-2 pickles that hold `chumpy` objects and a
scipy sparse matrix. `load_mano` uses a restricted unpickler: only an allow-list of numpy /
scipy.sparse reconstruction globals and inert stand-ins for chumpy classes can be resolved;
anything else (os.system, builtins.eval, ...) raises ValueError before it can run.
"""

import codecs
import dataclasses
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from diffhand_jax import checks
from diffhand_jax import mesh

NUM_VERTICES = 778
NUM_FACES = 1538
NUM_JOINTS = 16
NUM_BETAS = 10
NUM_POSE = 48
# Fingertip vertices used by FreiHAND: thumb, index, middle, ring, pinky.
TIP_VERTEX_IDS = (744, 320, 443, 555, 672)
# MANO joint id -> FreiHAND joint id (FreiHAND's utils/mano_utils.py).
MANO_TO_FREIHAND = {
    0: 0,
    1: 5,
    2: 6,
    3: 7,
    4: 9,
    5: 10,
    6: 11,
    7: 17,
    8: 18,
    9: 19,
    10: 13,
    11: 14,
    12: 15,
    13: 1,
    14: 2,
    15: 3,
}
# FreiHAND ids of the fingertips, in TIP_VERTEX_IDS order (thumb, index, middle, ring, pinky).
FREIHAND_TIP_IDS = (4, 8, 12, 16, 20)
# MANO's kinematic tree: wrist; index, middle, pinky, ring, thumb (3 joints each).
MANO_PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14)
_UINT32_ROOT = 2**32 - 1
# Full float32 matmuls: TF32/bf16 passes on GPUs/TPUs would cost ~0.1 mm of geometry.
_PRECISION = jax.lax.Precision.HIGHEST

# name: expected shape. Shapes of the official MANO_RIGHT.pkl.
_ARRAY_SHAPES = {
    'v_template': (NUM_VERTICES, 3),
    'shapedirs': (NUM_VERTICES, 3, NUM_BETAS),
    'posedirs': (NUM_VERTICES, 3, (NUM_JOINTS - 1) * 9),
    'J_regressor': (NUM_JOINTS, NUM_VERTICES),
    'weights': (NUM_VERTICES, NUM_JOINTS),
    'hands_mean': ((NUM_JOINTS - 1) * 3,),
    'hands_components': ((NUM_JOINTS - 1) * 3, (NUM_JOINTS - 1) * 3),
}
_FLOAT_FIELDS = tuple(_ARRAY_SHAPES)


# ---- Model container ----
@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class ManoModel:
  """A MANO-format hand model (right hand, metres).

  Attributes:
    v_template: [778, 3] rest-pose template.
    shapedirs: [778, 3, 10] shape blend shapes.
    posedirs: [778, 3, 135] pose-corrective blend shapes, driven by (R - I) of joints 1..15.
    J_regressor: [16, 778] dense joint regressor.
    weights: [778, 16] skinning weights.
    parents: [16] int, parent joint of each joint (-1 for the root). Static pytree data.
    faces: [1538, 3] int32 triangles (outward normals by the right-hand rule).
    hands_mean: [45] mean hand pose (axis-angle of joints 1..15).
    hands_components: [45, 45] PCA basis of hand poses (rows are components).
  """

  v_template: np.ndarray
  shapedirs: np.ndarray
  posedirs: np.ndarray
  J_regressor: np.ndarray  # pylint: disable=invalid-name
  weights: np.ndarray
  parents: np.ndarray
  faces: np.ndarray
  hands_mean: np.ndarray
  hands_components: np.ndarray

  def tree_flatten(self):
    # parents drive the Python loop of the kinematic chain, so they are static (hashable).
    leaves = tuple(getattr(self, name) for name in _FLOAT_FIELDS) + (self.faces,)
    return leaves, tuple(int(p) for p in np.asarray(self.parents))

  @classmethod
  def tree_unflatten(cls, parents, leaves):
    fields = dict(zip(_FLOAT_FIELDS + ('faces',), leaves))
    return cls(parents=np.asarray(parents, np.int32), **fields)


def make_model(arrays):
  """Validates a dict of arrays and builds a float32 `ManoModel`.

  Args:
    arrays: dict with the keys of `_ARRAY_SHAPES` plus `faces` (or `f`) and `parents` (or
      `kintree_table` [2, 16] with the root's parent stored as 2**32 - 1 or -1).

  Returns:
    The validated `ManoModel`.

  Raises:
    ValueError: on a missing key, a wrong shape, a non-finite value or a bad kinematic tree.
  """
  fields = {}
  for name, shape in _ARRAY_SHAPES.items():
    if name not in arrays:
      raise ValueError(
          f'MANO model is missing {name!r} (expected shape ' f'{checks.describe_shape(shape)})'
      )
    fields[name] = checks.check_array(
        f'MANO {name!r}', arrays[name], shape, kind=np.number, dtype=np.float32
    )
  fields['faces'] = _faces_from(arrays)
  fields['parents'] = _parents_from(arrays)
  for value in fields.values():
    value.setflags(write=False)  # models are shared (cached): nobody may edit them in place
  return ManoModel(**fields)


def _faces_from(arrays):
  key = 'faces' if 'faces' in arrays else 'f'
  if key not in arrays:
    raise ValueError(f"MANO model is missing 'f' (faces, expected shape [{NUM_FACES}, 3])")
  checks.check_array(f'MANO {key!r}', arrays[key], (NUM_FACES, 3))
  return mesh.check_faces(arrays[key], NUM_VERTICES, f'MANO {key!r}').astype(np.int32)


def _parents_from(arrays):
  """Parents [16] from `parents` or the official `kintree_table` [2, 16]."""
  if 'parents' in arrays:
    parents = checks.check_array("MANO 'parents'", arrays['parents'], (NUM_JOINTS,), dtype=np.int64)
  elif 'kintree_table' in arrays:
    table = checks.check_array(
        "MANO 'kintree_table'", arrays['kintree_table'], (2, NUM_JOINTS), dtype=np.int64
    )
    if sorted(table[1].tolist()) != list(range(NUM_JOINTS)):
      raise ValueError("MANO 'kintree_table' row 1 must list the joint ids 0..15")
    parents = np.empty(NUM_JOINTS, np.int64)
    parents[table[1]] = table[0]
  else:
    raise ValueError("MANO model is missing 'kintree_table' (expected shape [2, 16])")
  parents = np.where((parents == _UINT32_ROOT) | (parents < 0), -1, parents)
  if parents[0] != -1 or np.any(parents[1:] < 0) or np.any(parents[1:] >= np.arange(1, NUM_JOINTS)):
    raise ValueError(
        f'MANO kinematic tree must have root 0 and parents before children, '
        f'got parents {parents.tolist()}'
    )
  return parents.astype(np.int32)


# ---- Restricted unpickling of the official files ----
class _ChumpyStandIn:
  """Inert stand-in for any chumpy class: keeps the pickled state, runs nothing."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.state = state

  def to_array(self, key):
    """The array this chumpy object holds (`Ch.x`, or a `Select` of one)."""
    state = getattr(self, 'state', None)
    if not isinstance(state, dict):
      raise ValueError(f'MANO {key!r}: chumpy object without a state dict')
    if 'x' in state:
      return _to_array(state['x'], key)
    if 'a' in state and 'idxs' in state:  # chumpy.reordering.Select
      values = np.asarray(_to_array(state['a'], key)).ravel()[np.asarray(state['idxs'])]
      shape = state.get('preferred_shape')
      return values.reshape(shape) if shape is not None else values
    raise ValueError(f'MANO {key!r}: unsupported chumpy object (state keys ' f'{sorted(state)})')


class _SparseStandIn:
  """Stand-in for a pickled scipy.sparse csc/csr matrix; rebuilt from its arrays."""

  def __setstate__(self, state):
    self.state = state

  def to_array(self, key):
    state = getattr(self, 'state', None)
    try:
      shape = tuple(int(s) for s in state.get('_shape', state.get('shape')))
      data = np.asarray(state['data'])
      indices = np.asarray(state['indices'])
      indptr = np.asarray(state['indptr'])
      kind = str(state.get('format', self.kind))
      matrix_class = {'csc': scipy.sparse.csc_matrix, 'csr': scipy.sparse.csr_matrix}[kind]
      return matrix_class((data, indices, indptr), shape=shape).toarray()
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise ValueError(f'MANO {key!r}: corrupt sparse matrix ({e})') from e


class _CscStandIn(_SparseStandIn):
  kind = 'csc'


class _CsrStandIn(_SparseStandIn):
  kind = 'csr'


def _safe_reconstructor(cls, base, state):
  """copyreg._reconstructor restricted to `object.__new__` of our inert stand-ins."""
  stand_in = isinstance(cls, type) and issubclass(cls, (_ChumpyStandIn, _SparseStandIn))
  if not stand_in or base is not object or state is not None:
    raise ValueError(f'refusing copyreg._reconstructor({cls!r}, {base!r}, ...)')
  return object.__new__(cls)


def _safe_ndarray_reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise ValueError(f'refusing to rebuild array subtype {subtype!r}')
  return np.ndarray.__new__(np.ndarray, shape, dtype)


def _safe_codecs_encode(text, encoding='utf-8'):
  # Python 3 pickles of protocol < 3 store bytes as codecs.encode(str, 'latin1').
  if encoding not in ('latin1', 'latin-1'):
    raise ValueError(f'refusing codecs.encode with encoding {encoding!r}')
  return codecs.encode(text, encoding)


def _numpy_scalar():
  # Imported here: the module moved in numpy 2 and only the pickle loader needs it.
  try:
    from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
  except ImportError:  # numpy < 2
    from numpy.core import multiarray  # pylint: disable=g-import-not-at-top
  return multiarray.scalar


def _allowed_globals():
  """(module, name) -> object: everything a MANO pickle may reference."""
  allowed = {
      ('copy_reg', '_reconstructor'): _safe_reconstructor,
      ('copyreg', '_reconstructor'): _safe_reconstructor,
      ('_codecs', 'encode'): _safe_codecs_encode,
  }
  # Inert builtins that chumpy's bookkeeping state may contain.
  for builtin in (object, set, frozenset, slice, complex):
    for module in ('__builtin__', 'builtins'):
      allowed[(module, builtin.__name__)] = builtin
  for numpy_core in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    allowed[(numpy_core, '_reconstruct')] = _safe_ndarray_reconstruct
    allowed[(numpy_core, 'scalar')] = _numpy_scalar()
  for module in ('numpy', 'numpy.core.multiarray', 'numpy._core.multiarray'):
    allowed[(module, 'ndarray')] = np.ndarray
    allowed[(module, 'dtype')] = np.dtype
  for kind, stand_in in (('csc', _CscStandIn), ('csr', _CsrStandIn)):
    for module in ('scipy.sparse', f'scipy.sparse.{kind}', f'scipy.sparse._{kind}'):
      allowed[(module, f'{kind}_matrix')] = stand_in
  return allowed


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only allow-listed globals; chumpy classes become inert stand-ins."""

  _ALLOWED = None

  def find_class(self, module, name):
    if _RestrictedUnpickler._ALLOWED is None:
      _RestrictedUnpickler._ALLOWED = _allowed_globals()
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == 'chumpy' or module.startswith('chumpy.'):
      return _ChumpyStandIn
    raise ValueError(
        f'refusing to load global {module}.{name} from a MANO pickle '
        '(not on the allow-list; the file may be malicious)'
    )

  def persistent_load(self, pid):
    raise ValueError(f'refusing persistent id {pid!r} in a MANO pickle')


def _to_array(value, key):
  if isinstance(value, (_ChumpyStandIn, _SparseStandIn)):
    return value.to_array(key)
  return value


def _read_pickle(path, what='MANO pickle'):
  with open(path, 'rb') as f:
    try:
      data = _RestrictedUnpickler(f, encoding='latin1').load()
    except RecursionError as e:  # deeply nested containers: a hostile or broken file
      raise ValueError(f'{path}: not a readable {what} (nested too deeply)') from e
    except ValueError as e:  # the allow-list's refusals, and numpy's on bad array data
      raise ValueError(f'{path}: {e}') from e
    except Exception as e:  # corrupt or truncated files raise many different types
      raise ValueError(f'{path}: not a readable {what} ({type(e).__name__}: {e})') from e
  if not isinstance(data, dict):
    raise ValueError(f'{path}: expected a dict in the {what}, got {type(data).__name__}')
  return data


def read_restricted_pickle(path, what='pickle'):
  """Reads a pickled dict of numpy arrays and plain values with `load_mano`'s allow-list.

  For data-set annotation pickles (e.g. HO-3D's meta/*.pkl): numpy arrays and scalars,
  strings, numbers, None, lists and dicts load; any other global (os.system, builtins.eval,
  ...) raises ValueError before it can run.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a disallowed global, a corrupt file or not a dict.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} not found: {path}')
  return _read_pickle(path, what)


def _read_npz(path):
  try:
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except Exception as e:  # numpy's messages (e.g. too little data for a shape) lack the path
    raise ValueError(f'{path}: not a readable .npz file ({type(e).__name__}: {e})') from e


def load_mano(path):
  """Reads a MANO model from an official `.pkl` (no chumpy needed) or a `.npz`.

  Args:
    path: MANO_RIGHT.pkl / MANO_LEFT.pkl as distributed, a file written by `save_mano`, or an
      `.npz` with the same keys.

  Returns:
    The `ManoModel`.

  Raises:
    FileNotFoundError: when `path` does not exist.
    ValueError: on a disallowed pickle global, a corrupt file, a missing key or a wrong shape.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'MANO model file not found: {path}')
  raw = _read_npz(path) if path.endswith('.npz') else _read_pickle(path)
  arrays = {key: _to_array(value, key) for key, value in raw.items()}
  try:
    return make_model(arrays)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e


def save_mano(model, path):
  """Writes `model` in the official layout (`.pkl`) or as `.npz` (by extension).

  The pickle holds plain numpy arrays (no chumpy), `J_regressor` as a scipy csc_matrix, the
  `kintree_table` with the root's parent as 2**32 - 1, and `f` as uint32, like MANO_RIGHT.pkl.

  Args:
    model: a `ManoModel`.
    path: output file; `.npz` writes numpy's format, anything else a pickle.
  """
  path = os.fspath(path)
  arrays = {name: np.asarray(getattr(model, name)) for name in _FLOAT_FIELDS}
  parents = np.asarray(model.parents).astype(np.int64)
  kintree = np.stack([np.where(parents < 0, _UINT32_ROOT, parents), np.arange(NUM_JOINTS)]).astype(
      np.uint32
  )
  faces = np.asarray(model.faces).astype(np.uint32)
  v_shaped_joints = arrays['J_regressor'] @ arrays['v_template']
  if path.endswith('.npz'):
    np.savez(path, kintree_table=kintree, f=faces, J=v_shaped_joints, **arrays)
    return
  official = dict(arrays)
  official.update(
      {
          'J_regressor': scipy.sparse.csc_matrix(arrays['J_regressor'].astype(np.float64)),
          'kintree_table': kintree,
          'f': faces,
          'J': v_shaped_joints,
          'bs_type': 'lrotmin',
          'bs_style': 'lbs',
          'hands_coeffs': np.zeros((1, arrays['hands_mean'].shape[0]), np.float32),
      }
  )
  with open(path, 'wb') as f:
    pickle.dump(official, f, protocol=2)


# ---- Forward pass ----
def rodrigues(axis_angle):
  """Rotation matrices from axis-angle vectors, finite with finite gradients at zero.

  Uses R = I + a [r]x + b [r]x^2 with a = sin(t)/t and b = (1 - cos t)/t^2 written as
  0.5 * sinc(t/2)^2 (no cancellation in float32); below a tiny angle both come from their
  Taylor series, and `jnp.where` picks from a safe angle so no branch produces NaNs.

  Args:
    axis_angle: [..., 3].

  Returns:
    [..., 3, 3].
  """
  theta_sq = jnp.sum(axis_angle**2, axis=-1)
  small = theta_sq < 1e-8
  theta = jnp.sqrt(jnp.where(small, 1.0, theta_sq))
  half = 0.5 * theta
  a = jnp.where(small, 1.0 - theta_sq / 6.0, jnp.sin(theta) / theta)
  b = jnp.where(small, 0.5 - theta_sq / 24.0, 0.5 * (jnp.sin(half) / half) ** 2)
  rx, ry, rz = axis_angle[..., 0], axis_angle[..., 1], axis_angle[..., 2]
  zero = jnp.zeros_like(rx)
  skew = jnp.stack([zero, -rz, ry, rz, zero, -rx, -ry, rx, zero], -1)
  skew = skew.reshape(axis_angle.shape[:-1] + (3, 3))
  eye = jnp.eye(3, dtype=axis_angle.dtype)
  skew_sq = jnp.matmul(skew, skew, precision=_PRECISION)
  return eye + a[..., None, None] * skew + b[..., None, None] * skew_sq


def _einsum(subscripts, *operands):
  return jnp.einsum(subscripts, *operands, precision=_PRECISION)


def _freihand_order(num_joints=NUM_JOINTS):
  """Indices into concat([16 skeleton joints, 5 tips]) that give FreiHAND's 21 joints."""
  order = np.zeros(num_joints + len(FREIHAND_TIP_IDS), np.int32)
  for mano_id, freihand_id in MANO_TO_FREIHAND.items():
    order[freihand_id] = mano_id
  for tip, freihand_id in enumerate(FREIHAND_TIP_IDS):
    order[freihand_id] = num_joints + tip
  return order


def _check_tip_ids(tip_ids):
  tip_ids = tuple(int(t) for t in tip_ids)
  if len(tip_ids) != len(FREIHAND_TIP_IDS) or not all(0 <= t < NUM_VERTICES for t in tip_ids):
    raise ValueError(f'tip_ids must be 5 vertex ids in [0, {NUM_VERTICES}), got {tip_ids}')
  return np.asarray(tip_ids, np.int32)


def joint_regressor21(model, tip_ids=TIP_VERTEX_IDS):
  """The linear map R [21, 778] with joints = R @ vertices, FreiHAND order.

  Args:
    model: a `ManoModel`.
    tip_ids: fingertip vertices (thumb, index, middle, ring, pinky).

  Returns:
    np.ndarray float32 [21, 778]: the 16 J_regressor rows re-ordered plus one-hot tip rows.
  """
  tips = np.zeros((len(FREIHAND_TIP_IDS), NUM_VERTICES), np.float32)
  tips[np.arange(len(FREIHAND_TIP_IDS)), _check_tip_ids(tip_ids)] = 1.0
  stacked = np.concatenate([np.asarray(model.J_regressor, np.float32), tips])
  return stacked[_freihand_order()]


def full_pose(model, pose, flat_hand_mean=False):
  """[B, 48] axis-angle pose -> [B, 16, 3], adding `hands_mean` unless flat_hand_mean."""
  if flat_hand_mean:
    return pose.reshape(pose.shape[0], NUM_JOINTS, 3)
  hand = pose[:, 3:] + jnp.asarray(model.hands_mean, pose.dtype)
  return jnp.concatenate([pose[:, :3], hand], axis=1).reshape(pose.shape[0], NUM_JOINTS, 3)


def _depth_levels(parents):
  """Joint ids grouped by depth in the tree (root first); static Python tuples."""
  depth = []
  for parent in parents:
    depth.append(0 if parent < 0 else depth[parent] + 1)
  return tuple(
      tuple(k for k, d in enumerate(depth) if d == level) for level in range(max(depth) + 1)
  )


def _rigid_transforms(rotations, joints, parents):
  """Forward kinematics: world transforms that move rest-pose points with each joint.

  Joints of one depth are composed together (4 batched steps for MANO's tree, not 16).

  Args:
    rotations: [B, 16, 3, 3] local rotations.
    joints: [B, 16, 3] rest-pose joint locations.
    parents: static tuple of 16 parent ids.

  Returns:
    (rot [B, 16, 3, 3], trans [B, 16, 3]) such that a rest point p bound to joint k goes to
    rot[k] @ p + trans[k].
  """
  # Per-joint lists of static slices, no gathers or scatters: in jax 0.10.2 a matmul of two
  # gathered operands under jit(vmap(...)) fails XLA's HLO verifier.
  world_rot = [rotations[:, k] for k in range(len(parents))]
  world_pos = [joints[:, k] for k in range(len(parents))]
  for level in _depth_levels(parents)[1:]:
    up = [parents[k] for k in level]
    parent_rot = jnp.stack([world_rot[p] for p in up], axis=1)
    parent_pos = jnp.stack([world_pos[p] for p in up], axis=1)
    local_rot = jnp.stack([rotations[:, k] for k in level], axis=1)
    offset = jnp.stack([joints[:, k] - joints[:, p] for k, p in zip(level, up)], axis=1)
    level_pos = parent_pos + _einsum('bkij,bkj->bki', parent_rot, offset)
    level_rot = jnp.matmul(parent_rot, local_rot, precision=_PRECISION)
    for n, k in enumerate(level):
      world_rot[k], world_pos[k] = level_rot[:, n], level_pos[:, n]
  world_rot = jnp.stack(world_rot, axis=1)
  world_pos = jnp.stack(world_pos, axis=1)
  # Remove the rest position: a point at the rest joint must land at the posed joint.
  trans = world_pos - _einsum('bkij,bkj->bki', world_rot, joints)
  return world_rot, trans


def mano_forward(model, pose, betas, transl=None, *, flat_hand_mean=False, tip_ids=TIP_VERTEX_IDS):
  """MANO linear blend skinning.

  Args:
    model: a `ManoModel`.
    pose: [B, 48] axis-angle, global orientation first, then 15 hand joints (relative to
      `hands_mean` unless flat_hand_mean: smplx semantics).
    betas: [B, 10] shape coefficients.
    transl: optional [B, 3] translation added to vertices and joints.
    flat_hand_mean: if True, `pose` is the full pose and `hands_mean` is not added.
    tip_ids: fingertip vertex ids (thumb, index, middle, ring, pinky).

  Returns:
    vertices [B, 778, 3] and joints [B, 21, 3] (FreiHAND order), metres, float32.
  """
  # Shapes only: the forward pass runs under jit and grad, values are not inspected.
  pose = checks.check_array(
      'pose', jnp.asarray(pose, jnp.float32), ('batch', NUM_POSE), finite=False
  )
  batch = pose.shape[0]
  betas = checks.check_array(
      'betas', jnp.asarray(betas, jnp.float32), (batch, NUM_BETAS), finite=False
  )
  if transl is not None:
    transl = checks.check_array(
        'transl', jnp.asarray(transl, jnp.float32), (batch, 3), finite=False
    )
  parents = tuple(int(p) for p in np.asarray(model.parents))
  tips = _check_tip_ids(tip_ids)

  v_shaped = model.v_template + _einsum('vcs,bs->bvc', model.shapedirs, betas)
  rest_joints = _einsum('jv,bvc->bjc', model.J_regressor, v_shaped)
  rotations = rodrigues(full_pose(model, pose, flat_hand_mean))
  pose_feature = (rotations[:, 1:] - jnp.eye(3)).reshape(pose.shape[0], -1)
  v_posed = v_shaped + _einsum('vcp,bp->bvc', model.posedirs, pose_feature)

  rot, trans = _rigid_transforms(rotations, rest_joints, parents)
  vertex_rot = _einsum('vk,bkij->bvij', model.weights, rot)
  vertex_trans = _einsum('vk,bki->bvi', model.weights, trans)
  vertices = _einsum('bvij,bvj->bvi', vertex_rot, v_posed) + vertex_trans
  if transl is not None:
    vertices = vertices + transl[:, None, :]

  skeleton = _einsum('jv,bvc->bjc', model.J_regressor, vertices)
  joints = jnp.concatenate([skeleton, vertices[:, tips]], axis=1)[:, _freihand_order()]
  return vertices, joints
