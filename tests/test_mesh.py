"""Mesh helpers: normals against naive loops (numpy and jnp), .obj / .ply read back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax import mesh

# A closed octahedron with outward (counter-clockwise seen from outside) faces.
OCTAHEDRON_VERTICES = np.array(
    [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], np.float64
)
OCTAHEDRON_FACES = np.array(
    [[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]]
)


def naive_face_normals(vertices, faces):
  out = []
  for a, b, c in faces:
    n = np.cross(vertices[b] - vertices[a], vertices[c] - vertices[a])
    out.append(n / np.linalg.norm(n))
  return np.array(out)


def naive_vertex_normals(vertices, faces):
  out = np.zeros_like(vertices)
  for a, b, c in faces:
    n = np.cross(vertices[b] - vertices[a], vertices[c] - vertices[a])  # 2 * area * unit
    for v in (a, b, c):
      out[v] += n
  norm = np.linalg.norm(out, axis=1, keepdims=True)
  return out / np.where(norm > 0, norm, 1.0)


@pytest.fixture
def random_mesh():
  rng = np.random.default_rng(0)
  vertices = rng.standard_normal((32, 3))  # the last two are not used by any face
  faces = np.array([rng.choice(30, 3, replace=False) for _ in range(50)])
  return vertices, faces


def test_face_normals_numpy_and_jnp_match_naive(random_mesh):
  vertices, faces = random_mesh
  want = naive_face_normals(vertices, faces)
  got = mesh.face_normals(vertices, faces)
  assert isinstance(got, np.ndarray)
  np.testing.assert_allclose(got, want, atol=1e-12)
  got_jnp = jax.jit(mesh.face_normals)(jnp.asarray(vertices, jnp.float32), jnp.asarray(faces))
  np.testing.assert_allclose(got_jnp, want, atol=1e-5)


def test_normals_batched(random_mesh):
  vertices, faces = random_mesh
  batch = np.stack([vertices, 2.0 * vertices + 1.0])
  faces_out = mesh.face_normals(batch, faces)
  vertex_out = mesh.vertex_normals(jnp.asarray(batch), faces)
  assert faces_out.shape == (2, 50, 3) and vertex_out.shape == (2, 32, 3)
  used = np.unique(faces)
  for b in range(2):
    np.testing.assert_allclose(faces_out[b], naive_face_normals(batch[b], faces), atol=1e-12)
    np.testing.assert_allclose(
        vertex_out[b, used], naive_vertex_normals(batch[b], faces)[used], atol=1e-5
    )
    np.testing.assert_allclose(
        mesh.vertex_normals(batch, faces)[b, used],
        naive_vertex_normals(batch[b], faces)[used],
        atol=1e-12,
    )


def test_vertex_normals_jit_with_traced_faces(random_mesh):
  vertices, faces = random_mesh
  got = jax.jit(mesh.vertex_normals)(jnp.asarray(vertices, jnp.float32), jnp.asarray(faces))
  used = np.unique(faces)
  np.testing.assert_allclose(got[used], naive_vertex_normals(vertices, faces)[used], atol=1e-5)


def test_vertex_normals_match_naive_and_point_out(random_mesh):
  vertices, faces = random_mesh
  used = np.unique(faces)
  got = mesh.vertex_normals(vertices, faces)
  np.testing.assert_allclose(got[used], naive_vertex_normals(vertices, faces)[used], atol=1e-12)
  unused = np.setdiff1d(np.arange(len(vertices)), used)
  np.testing.assert_array_equal(got[unused], 0.0)  # isolated vertices: zero, not NaN
  normals = mesh.vertex_normals(OCTAHEDRON_VERTICES, OCTAHEDRON_FACES)
  np.testing.assert_allclose(normals, OCTAHEDRON_VERTICES, atol=1e-12)  # by symmetry
  face_normals = mesh.face_normals(OCTAHEDRON_VERTICES, OCTAHEDRON_FACES)
  np.testing.assert_allclose(face_normals, np.sign(face_normals) / np.sqrt(3), atol=1e-12)
  centroids = OCTAHEDRON_VERTICES[OCTAHEDRON_FACES].mean(1)
  assert np.all(np.einsum('fi,fi->f', face_normals, centroids) > 0)


def test_degenerate_face_gives_zero_not_nan():
  vertices = np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0]])
  normals = mesh.face_normals(vertices, np.array([[0, 1, 2]]))
  np.testing.assert_array_equal(normals, np.zeros((1, 3)))
  grad = jax.grad(lambda v: mesh.face_normals(v, jnp.array([[0, 1, 2]])).sum())(
      jnp.asarray(vertices, jnp.float32)
  )
  assert np.all(np.isfinite(grad))


def test_boundary_loops():
  assert mesh.boundary_loops(OCTAHEDRON_FACES) == []  # closed
  open_faces = OCTAHEDRON_FACES[~np.any(OCTAHEDRON_FACES == 5, axis=1)]  # drop a pole
  (loop,) = mesh.boundary_loops(open_faces)
  assert sorted(loop) == [0, 1, 2, 3]
  for a, b in zip(loop, np.roll(loop, -1)):  # consecutive ids share an edge
    assert any({a, b} <= set(face) for face in open_faces)
  loops = mesh.boundary_loops(np.array([[0, 1, 2], [3, 4, 5]]))
  assert sorted(sorted(l) for l in loops) == [[0, 1, 2], [3, 4, 5]]


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match='vertices'):
    mesh.face_normals(np.zeros((4, 2)), OCTAHEDRON_FACES)
  with pytest.raises(ValueError, match='faces'):
    mesh.vertex_normals(np.zeros((4, 3)), np.zeros((4,), int))


def read_obj(path):
  vertices, faces = [], []
  for line in path.read_text().splitlines():
    kind, *values = line.split()
    if kind == 'v':
      vertices.append([float(x) for x in values])
    elif kind == 'f':
      faces.append([int(x) - 1 for x in values])
  return np.array(vertices), np.array(faces)


def read_ply(path):
  lines = path.read_text().splitlines()
  assert lines[0] == 'ply' and lines[1] == 'format ascii 1.0'
  num_vertices = int(next(l for l in lines if l.startswith('element vertex')).split()[-1])
  num_faces = int(next(l for l in lines if l.startswith('element face')).split()[-1])
  body = lines[lines.index('end_header') + 1 :]
  vertices = np.array([[float(x) for x in l.split()] for l in body[:num_vertices]])
  faces = []
  for l in body[num_vertices : num_vertices + num_faces]:
    count, *ids = l.split()
    assert int(count) == 3
    faces.append([int(i) for i in ids])
  return vertices, np.array(faces)


@pytest.mark.parametrize('writer,reader', [(mesh.save_obj, read_obj), (mesh.save_ply, read_ply)])
def test_writers_read_back(tmp_path, random_mesh, writer, reader):
  vertices, faces = random_mesh
  path = tmp_path / 'mesh.txt'
  writer(path, vertices.astype(np.float32), faces)
  got_vertices, got_faces = reader(path)
  np.testing.assert_allclose(got_vertices, vertices.astype(np.float32), rtol=1e-7)
  np.testing.assert_array_equal(got_faces, faces)


@pytest.mark.parametrize('writer', [mesh.save_obj, mesh.save_ply])
def test_writers_reject_bad_input(tmp_path, writer):
  with pytest.raises(ValueError, match='NaN'):
    writer(tmp_path / 'a', np.full((3, 3), np.nan), np.array([[0, 1, 2]]))
  with pytest.raises(ValueError, match='outside'):
    writer(tmp_path / 'a', np.zeros((3, 3)), np.array([[0, 1, 3]]))
  with pytest.raises(ValueError, match='vertices'):
    writer(tmp_path / 'a', np.zeros((3, 2)), np.array([[0, 1, 2]]))


def test_taubin_smoothing_matches_the_dense_one_ring_form():
  from diffhand_jax import metrics, procedural_mano  # pylint: disable=g-import-not-at-top

  hand = procedural_mano.procedural_hand(0)
  faces = np.asarray(hand.faces)
  rng = np.random.default_rng(0)
  verts = hand.v_template[None] + rng.normal(scale=0.002, size=(2, 778, 3))  # a rough hand
  ring_mean = metrics.one_ring_mean_matrix(faces)  # independent: a dense [V, V] matrix
  want = verts.copy()
  for _ in range(2):
    for factor in (0.5, -0.53):
      want = want + factor * (np.einsum('uv,nvd->nud', ring_mean, want) - want)
  got = np.asarray(mesh.taubin_smooth(jnp.asarray(verts, jnp.float32), faces, 2))
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert np.all(metrics.roughness(got, faces) < 0.6 * metrics.roughness(verts, faces))
  zero = jnp.asarray(verts, jnp.float32)
  np.testing.assert_array_equal(mesh.taubin_smooth(zero, faces, 0), zero)
