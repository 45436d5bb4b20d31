"""MANO layer: forward pass against a naive numpy LBS, file loading, safety, errors."""

import copyreg
import io
import os
import pickle
import struct
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.sparse
from scipy.spatial.transform import Rotation

from diffhand_jax import mano
from diffhand_jax import procedural_mano

FIELDS = (
    'v_template',
    'shapedirs',
    'posedirs',
    'J_regressor',
    'weights',
    'parents',
    'faces',
    'hands_mean',
    'hands_components',
)
# Written out here (not imported) so the test checks the module's table: MANO id -> FreiHAND id.
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
TIPS = {4: 744, 8: 320, 12: 443, 16: 555, 20: 672}


# One jitted forward for the whole file: eager dispatch of the LBS ops is slow on CPU.
forward = jax.jit(mano.mano_forward, static_argnames=('flat_hand_mean', 'tip_ids'))


@pytest.fixture(scope='module')
def model():
  return procedural_mano.procedural_hand(0)


def naive_forward(model, pose, betas, transl, flat_hand_mean=False, tips=TIPS):
  """Textbook MANO in float64: loops over joints, 4x4 homogeneous matrices, scipy rotations."""
  f64 = lambda name: np.asarray(getattr(model, name), np.float64)
  parents = [int(p) for p in model.parents]
  full = np.array(pose, np.float64)
  if not flat_hand_mean:
    full[3:] += f64('hands_mean')
  v_shaped = f64('v_template') + np.tensordot(f64('shapedirs'), betas, axes=([2], [0]))
  rest = f64('J_regressor') @ v_shaped
  rotations = [Rotation.from_rotvec(full[3 * k : 3 * k + 3]).as_matrix() for k in range(16)]
  feature = np.concatenate([(rotations[k] - np.eye(3)).ravel() for k in range(1, 16)])
  v_posed = v_shaped + np.tensordot(f64('posedirs'), feature, axes=([2], [0]))
  world = []
  for k in range(16):
    local = np.eye(4)
    local[:3, :3] = rotations[k]
    local[:3, 3] = rest[k] - (rest[parents[k]] if parents[k] >= 0 else 0.0)
    world.append(local if parents[k] < 0 else world[parents[k]] @ local)
  skinning = []
  for k in range(16):
    unpose = np.eye(4)
    unpose[:3, 3] = -rest[k]
    skinning.append(world[k] @ unpose)
  weights = f64('weights')
  vertices = np.zeros_like(v_posed)
  for v in range(len(v_posed)):
    blended = sum(weights[v, k] * skinning[k] for k in range(16))
    vertices[v] = (blended @ np.append(v_posed[v], 1.0))[:3] + transl
  skeleton = f64('J_regressor') @ vertices
  joints = np.zeros((21, 3))
  for mano_id, freihand_id in MANO_TO_FREIHAND.items():
    joints[freihand_id] = skeleton[mano_id]
  for freihand_id, vertex in tips.items():
    joints[freihand_id] = vertices[vertex]
  return vertices, joints


def random_poses(rng, batch):
  """Axis-angle poses with angles up to pi, including exact zeros and exactly pi."""
  axes = rng.standard_normal((batch, 16, 3))
  axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
  angles = rng.uniform(0.0, np.pi, (batch, 16, 1))
  angles[0, :4] = 0.0
  angles[1, 4:6] = np.pi
  return (axes * angles).reshape(batch, 48).astype(np.float32)


@pytest.mark.parametrize('flat_hand_mean', [False, True])
def test_forward_matches_naive_lbs(model, flat_hand_mean):
  rng = np.random.default_rng(1)
  batch = 4
  pose = random_poses(rng, batch)
  betas = rng.standard_normal((batch, 10)).astype(np.float32)
  transl = rng.uniform(-0.5, 0.5, (batch, 3)).astype(np.float32)
  vertices, joints = forward(model, pose, betas, transl, flat_hand_mean=flat_hand_mean)
  assert vertices.shape == (batch, 778, 3) and joints.shape == (batch, 21, 3)
  assert vertices.dtype == jnp.float32
  worst = 0.0
  for b in range(batch):
    ref_v, ref_j = naive_forward(model, pose[b], betas[b], transl[b], flat_hand_mean)
    worst = max(worst, np.abs(vertices[b] - ref_v).max(), np.abs(joints[b] - ref_j).max())
  print(f'max |mano_forward - naive| = {worst:.3g} m')
  assert worst <= 1e-5


def test_rodrigues_matches_scipy_including_tiny_angles():
  rng = np.random.default_rng(2)
  vectors = rng.standard_normal((20, 3))
  vectors *= rng.uniform(0.0, np.pi, (20, 1)) / np.linalg.norm(vectors, axis=1, keepdims=True)
  vectors = np.concatenate([vectors, [[0, 0, 0], [1e-9, 0, 0], [0, 3e-5, 1e-5], [0, 0, np.pi]]])
  got = mano.rodrigues(jnp.asarray(vectors, jnp.float32))
  want = Rotation.from_rotvec(vectors).as_matrix()
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_rodrigues_gradient_at_zero_is_the_skew_generator():
  jacobian = jax.jit(jax.jacfwd(mano.rodrigues))(jnp.zeros(3))  # [3, 3, 3]: dR/dr_i
  for i in range(3):
    generator = np.cross(np.eye(3)[i], np.eye(3))  # rows: e_i x e_j, i.e. [e_i]x transposed
    np.testing.assert_allclose(jacobian[:, :, i], generator.T, atol=1e-6)
  assert np.all(np.isfinite(jax.jit(jax.jacrev(mano.rodrigues))(jnp.zeros(3))))


def test_gradients_finite_at_zero_pose(model):
  betas = jnp.zeros((2, 10))

  def loss(pose):
    vertices, joints = mano.mano_forward(model, pose, betas, flat_hand_mean=True)
    return jnp.sum(vertices**2) + jnp.sum(joints**2)

  grad = jax.jit(jax.grad(loss))(jnp.zeros((2, 48)))
  assert np.all(np.isfinite(grad))
  assert np.abs(grad).max() > 0  # the pose does move the mesh


def test_vmap_agrees_with_per_batch_calls(model):
  rng = np.random.default_rng(3)
  # Batches of 4 with a translation: the signature the naive test already compiled.
  pose = random_poses(rng, 8).reshape(2, 4, 48)
  betas = rng.standard_normal((2, 4, 10)).astype(np.float32)
  transl = rng.standard_normal((2, 4, 3)).astype(np.float32)
  eager = [forward(model, pose[k], betas[k], transl[k]) for k in range(2)]
  mapped = jax.jit(jax.vmap(lambda p, b, t: mano.mano_forward(model, p, b, t)))(pose, betas, transl)
  for k in range(2):
    np.testing.assert_allclose(mapped[0][k], eager[k][0], atol=1e-6)
    np.testing.assert_allclose(mapped[1][k], eager[k][1], atol=1e-6)


def test_joint_regressor21_reproduces_forward_joints(model):
  rng = np.random.default_rng(4)
  pose = random_poses(rng, 4)
  vertices, joints = forward(
      model, pose, np.zeros((4, 10), np.float32), np.zeros((4, 3), np.float32)
  )
  regressor = mano.joint_regressor21(model)
  assert regressor.shape == (21, 778)
  np.testing.assert_allclose(np.einsum('jv,bvc->bjc', regressor, vertices), joints, atol=1e-6)
  for freihand_id, vertex in TIPS.items():
    assert regressor[freihand_id, vertex] == 1.0 and regressor[freihand_id].sum() == 1.0
  np.testing.assert_array_equal(regressor[9], model.J_regressor[4])  # middle MCP


def test_tip_ids_are_a_parameter(model):
  tips = (745, 333, 444, 556, 673)
  pose = np.zeros((1, 48), np.float32)
  vertices, joints = forward(model, pose, np.zeros((1, 10)), tip_ids=tips)
  np.testing.assert_array_equal(joints[0, [4, 8, 12, 16, 20]], vertices[0, list(tips)])
  with pytest.raises(ValueError, match='tip_ids'):
    mano.joint_regressor21(model, tip_ids=(1, 2, 3))


def test_bad_inputs_raise(model):
  with pytest.raises(ValueError, match='pose'):
    mano.mano_forward(model, np.zeros((2, 45)), np.zeros((2, 10)))
  with pytest.raises(ValueError, match='betas'):
    mano.mano_forward(model, np.zeros((2, 48)), np.zeros((2, 16)))
  with pytest.raises(ValueError, match='transl'):
    mano.mano_forward(model, np.zeros((2, 48)), np.zeros((2, 10)), np.zeros((3,)))


def assert_same_model(a, b):
  for name in FIELDS:
    np.testing.assert_array_equal(
        np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), err_msg=name
    )


@pytest.mark.parametrize('suffix', ['.pkl', '.npz'])
def test_save_load_round_trip(model, tmp_path, suffix):
  path = tmp_path / f'hand{suffix}'
  mano.save_mano(model, path)
  assert_same_model(mano.load_mano(path), model)


def test_saved_pickle_has_the_official_layout(model, tmp_path):
  path = tmp_path / 'MANO_RIGHT.pkl'
  mano.save_mano(model, path)
  with open(path, 'rb') as f:
    data = pickle.load(f, encoding='latin1')
  assert isinstance(data['J_regressor'], scipy.sparse.csc_matrix)
  assert data['kintree_table'].shape == (2, 16) and data['kintree_table'][0, 0] == 2**32 - 1
  assert data['f'].dtype == np.uint32 and data['f'].shape == (1538, 3)
  for key in ('hands_coeffs', 'J', 'bs_type', 'bs_style', 'hands_components', 'hands_mean'):
    assert key in data


# ---- A pickle in the layout of the official MANO_RIGHT.pkl (chumpy objects, old paths) ----
class Ch:
  """Stand-in for chumpy.ch.Ch: pickles its state dict with the array under 'x'."""

  def __init__(self, x):
    self.x = x
    self._dirty_vars = set()  # chumpy keeps bookkeeping next to x

  def __reduce__(self):
    return (copyreg._reconstructor, (type(self), object, None), dict(self.__dict__))


class Select:
  """Stand-in for chumpy.reordering.Select: a.r.ravel()[idxs] reshaped."""

  def __init__(self, a, idxs, preferred_shape):
    self.a, self.idxs, self.preferred_shape = a, idxs, preferred_shape

  def __reduce__(self):
    return (copyreg._reconstructor, (type(self), object, None), dict(self.__dict__))


@pytest.fixture
def chumpy_modules(monkeypatch):
  """Registers the stand-ins under chumpy's module names so pickle writes those paths."""
  for module_name, cls in (('chumpy.ch', Ch), ('chumpy.reordering', Select)):
    module = types.ModuleType(module_name)
    setattr(module, cls.__name__, cls)
    monkeypatch.setattr(cls, '__module__', module_name)
    monkeypatch.setitem(sys.modules, module_name, module)
  monkeypatch.setitem(sys.modules, 'chumpy', types.ModuleType('chumpy'))


class Python2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes `bytes` and ASCII `str` the way Python 2 wrote its `str`: (SHORT_)BINSTRING.

  Python 2's MANO pickles store keys and numpy's raw array data as 8-bit strings; reading
  them needs encoding='latin1'. Python 3's own protocol 2 would write BINUNICODE and
  `_codecs.encode(...)` calls instead.
  """

  dispatch = pickle._Pickler.dispatch.copy()  # pylint: disable=protected-access

  def write_py2_str(self, data, original):
    if len(data) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
    else:
      self.write(pickle.BINSTRING + struct.pack('<i', len(data)) + data)
    self.memoize(original)

  def save_py2_str(self, data):
    self.write_py2_str(data, data)

  def save_str_or_unicode(self, text):
    if text.isascii():
      self.write_py2_str(text.encode('ascii'), text)
    else:
      self.save_str(text)

  dispatch[bytes] = save_py2_str
  dispatch[str] = save_str_or_unicode


def official_layout_bytes(model):
  """Bytes of a protocol-2 pickle laid out like MANO_RIGHT.pkl."""
  arrays = {name: np.asarray(getattr(model, name), np.float64) for name in FIELDS[:5]}
  shapedirs = arrays['shapedirs']
  order = np.random.default_rng(0).permutation(shapedirs.size)
  scrambled = np.empty(shapedirs.size)
  scrambled[order] = shapedirs.ravel()  # Select(a, idxs=order) undoes the scramble
  parents = np.asarray(model.parents).astype(np.int64)
  data = {
      'hands_components': np.asarray(model.hands_components, np.float64),
      'f': np.asarray(model.faces).astype(np.uint32),
      'J_regressor': scipy.sparse.csc_matrix(arrays['J_regressor']),
      'kintree_table': np.stack(
          [np.where(parents < 0, 2**32 - 1, parents), np.arange(16)]
      ).astype(np.uint32),
      'J': arrays['J_regressor'] @ arrays['v_template'],
      'bs_style': 'lbs',
      'hands_coeffs': np.zeros((3, 45)),
      'weights': Ch(arrays['weights']),
      'posedirs': Ch(arrays['posedirs']),
      'hands_mean': np.asarray(model.hands_mean, np.float64),
      'v_template': Ch(arrays['v_template']),
      'shapedirs': Select(Ch(scrambled), order, shapedirs.shape),
      'bs_type': 'lrotmin',
  }
  buffer = io.BytesIO()
  Python2Pickler(buffer, protocol=2).dump(data)
  raw = buffer.getvalue()
  # Python 2 era module paths, as in the distributed file.
  raw = raw.replace(b'scipy.sparse._csc\n', b'scipy.sparse.csc\n')
  return raw.replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n')


def test_loads_official_layout_without_chumpy(model, tmp_path, chumpy_modules):
  del chumpy_modules
  raw = official_layout_bytes(model)
  assert b'chumpy.ch\nCh' in raw and b'chumpy.reordering\nSelect' in raw
  assert b'scipy.sparse.csc\ncsc_matrix' in raw
  assert b'copy_reg\n_reconstructor' in raw and b'_codecs' not in raw  # Python 2 style
  path = tmp_path / 'MANO_RIGHT.pkl'
  path.write_bytes(raw)
  for name in ('chumpy', 'chumpy.ch', 'chumpy.reordering'):
    sys.modules.pop(name)  # the loader must not need them
  loaded = mano.load_mano(path)
  assert_same_model(loaded, model)
  assert loaded.faces.dtype == np.int32 and loaded.parents[0] == -1


class Payload:
  """A pickle that runs `call(*args)` on load."""

  def __init__(self, call, *args):
    self.call, self.args = call, args

  def __reduce__(self):
    return (self.call, self.args)


@pytest.mark.parametrize(
    'make_payload,name',
    [
        (lambda marker: Payload(os.system, f'touch {marker}'), 'system'),
        (lambda marker: Payload(eval, f"open({str(marker)!r}, 'w').close()"), 'eval'),
        (lambda marker: Payload(exec, f"open({str(marker)!r}, 'w').close()"), 'exec'),
        (lambda marker: Payload(__import__('subprocess').Popen, ['touch', str(marker)]), 'Popen'),
        # An allowed helper used on a class that is not one of the loader's stand-ins.
        (lambda marker: Payload(copyreg._reconstructor, set, object, None), '_reconstructor'),
    ],
)
def test_malicious_pickle_is_refused_and_not_run(model, tmp_path, make_payload, name):
  marker = tmp_path / 'MARKER'
  data = {name: np.asarray(getattr(model, name)) for name in FIELDS[:5]}
  data['v_template'] = make_payload(marker)
  path = tmp_path / 'evil.pkl'
  path.write_bytes(pickle.dumps(data, protocol=2))
  with pytest.raises(ValueError, match=name):
    mano.load_mano(path)
  assert not marker.exists()


def test_missing_key_and_wrong_shape_are_named(model, tmp_path):
  arrays = {name: np.asarray(getattr(model, name)) for name in FIELDS}
  del arrays['posedirs']
  path = tmp_path / 'missing.npz'
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=r'posedirs.*\[778, 3, 135\]'):
    mano.load_mano(path)
  arrays['posedirs'] = np.zeros((778, 3, 134))
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=r'posedirs.*\[778, 3, 135\], got \(778, 3, 134\)'):
    mano.load_mano(path)
  arrays['posedirs'] = np.full((778, 3, 135), np.nan)
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match='posedirs.*NaN'):
    mano.load_mano(path)


def test_missing_and_corrupt_files(model, tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.pkl'):
    mano.load_mano(tmp_path / 'nope.pkl')
  path = tmp_path / 'hand.pkl'
  mano.save_mano(model, path)
  path.write_bytes(path.read_bytes()[:5000])  # truncated
  with pytest.raises(ValueError, match='hand.pkl'):
    mano.load_mano(path)
  path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
  with pytest.raises(ValueError, match='dict'):
    mano.load_mano(path)


def test_load_hand_model_and_cli(model, tmp_path):
  config = ml_collections.ConfigDict({'mano_path': '', 'mano_seed': 0})
  assert_same_model(procedural_mano.load_hand_model(config), model)
  path = tmp_path / 'synth.pkl'
  procedural_mano.main([str(path), '--seed', '0'])
  config.mano_path = str(path)
  assert_same_model(procedural_mano.load_hand_model(config), model)


def test_model_is_a_pytree_with_static_parents(model):
  leaves, treedef = jax.tree_util.tree_flatten(model)
  assert len(leaves) == 8
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert_same_model(rebuilt, model)
  assert isinstance(rebuilt.parents, np.ndarray)
  np.testing.assert_array_equal(model.parents, mano.MANO_PARENTS)
