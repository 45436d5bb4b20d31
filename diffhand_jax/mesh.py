"""Triangle-mesh helpers: face and vertex normals (numpy or jnp), boundary loops, .obj / .ply.

The normal functions take the array module from their input, so the same code serves the
numpy data generator and the JAX losses (`face_normals(jnp_vertices, faces)` is jittable).
"""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffhand_jax import checks


def _array_module(x):
  return np if isinstance(x, np.ndarray) else jnp


def check_faces(faces, num_vertices, name='faces'):
  """Returns `faces` as int64 [F, 3] after checking they index vertices in [0, num_vertices)."""
  faces = checks.check_array(name, faces, ('F', 3), kind=np.integer)
  if faces.size and (faces.min() < 0 or faces.max() >= num_vertices):
    raise ValueError(f'{name} index vertices outside [0, {num_vertices})')
  return faces.astype(np.int64)


def _check_mesh(vertices, faces):
  """Shapes only: the normal functions also run on traced arrays."""
  checks.check_array('vertices', vertices, (Ellipsis, 'V', 3), finite=False)
  checks.check_array('faces', faces, ('F', 3), finite=False)


def _normalize(xp, v, eps):
  # Clamp the squared norm before the sqrt so gradients stay finite at zero length too.
  return v / xp.sqrt(xp.maximum(xp.sum(v * v, axis=-1, keepdims=True), eps * eps))


def face_normals(vertices, faces, eps=1e-12):
  """Unit normals of each triangle, right-hand rule (v1 - v0) x (v2 - v0).

  Args:
    vertices: [..., V, 3] (numpy or jnp; the result has the same type).
    faces: [F, 3] integer vertex ids.
    eps: floor on the norm so degenerate faces give a zero-length normal, not NaN.

  Returns:
    [..., F, 3] unit normals.
  """
  xp = _array_module(vertices)
  _check_mesh(vertices, faces)
  faces = np.asarray(faces) if xp is np else faces
  v0 = vertices[..., faces[:, 0], :]
  v1 = vertices[..., faces[:, 1], :]
  v2 = vertices[..., faces[:, 2], :]
  return _normalize(xp, xp.cross(v1 - v0, v2 - v0), eps)


def vertex_normals(vertices, faces, eps=1e-12):
  """Unit vertex normals: area-weighted sum of the normals of the incident faces.

  Args:
    vertices: [..., V, 3] (numpy or jnp).
    faces: [F, 3] integer vertex ids.
    eps: floor on the norm (isolated vertices get a zero normal).

  Returns:
    [..., V, 3] unit normals.
  """
  xp = _array_module(vertices)
  _check_mesh(vertices, faces)
  if xp is np:
    faces = np.asarray(faces)
  v0 = vertices[..., faces[:, 0], :]
  v1 = vertices[..., faces[:, 1], :]
  v2 = vertices[..., faces[:, 2], :]
  # The unnormalised cross product has length 2 * area: area weighting for free.
  weighted = xp.cross(v1 - v0, v2 - v0)
  if xp is np:
    summed = np.zeros(vertices.shape, weighted.dtype)
    by_vertex = np.moveaxis(summed, -2, 0)  # a view: scatter along the vertex axis
    for corner in range(3):
      np.add.at(by_vertex, faces[:, corner], np.moveaxis(weighted, -2, 0))
  else:  # a scatter-add, so `faces` may be traced under jit
    summed = jnp.zeros(vertices.shape, weighted.dtype)
    for corner in range(3):
      summed = summed.at[..., faces[:, corner], :].add(weighted)
  return _normalize(xp, summed, eps)


def one_ring_edges(faces, num_vertices: int):
  """(senders, receivers, inverse degree): the mesh's directed edges, each undirected edge once
  per direction, and 1 / (number of one-ring neighbours) per vertex (0 for an isolated one).

  Static numpy arrays (E ~ 4,600 int32 pairs for MANO), so a compiled step holds a few kB.
  """
  faces = np.asarray(faces, np.int64)
  pairs = np.concatenate([faces[:, [a, b]] for a, b in ((0, 1), (1, 2), (2, 0))])
  pairs = np.concatenate([pairs, pairs[:, ::-1]])
  pairs = np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)
  degree = np.bincount(pairs[:, 1], minlength=num_vertices).astype(np.float32)
  inverse = np.where(degree > 0, 1.0 / np.maximum(degree, 1.0), 0.0).astype(np.float32)
  return pairs[:, 0].astype(np.int32), pairs[:, 1].astype(np.int32), inverse


def umbrella_laplacian(verts: jax.Array, faces) -> jax.Array:
  """v minus the mean of its one-ring neighbours, per vertex: [B, N, 3] -> [B, N, 3].

  The uniform (umbrella) Laplacian whose length metrics.roughness averages; zero for an
  isolated vertex's neighbour mean (it then returns v itself).
  """
  return _laplacian(verts, one_ring_edges(faces, verts.shape[1]))


def _laplacian(verts: jax.Array, edges) -> jax.Array:
  """`umbrella_laplacian` over precomputed `one_ring_edges`."""
  senders, receivers, inverse = edges
  sums = jax.vmap(
      lambda v: jax.ops.segment_sum(v[senders], receivers, num_segments=verts.shape[1])
  )(verts)
  return verts - sums * inverse[None, :, None]


def taubin_smooth(
    verts: jax.Array, faces, iterations: int, lam: float = 0.5, mu: float = -0.53
) -> jax.Array:
  """Taubin's lambda|mu smoothing with uniform one-ring weights: [..., N, 3] -> [..., N, 3].

  Each iteration moves every vertex towards the mean of its neighbours by `lam`, then away by
  `-mu` (a low-pass filter over the surface that, unlike plain Laplacian smoothing, does not
  shrink the mesh). Plain JAX over static edge lists: jit, vmap and autodiff work through it.

  Args:
    verts: [..., N, 3] meshes sharing `faces`.
    faces: [F, 3] integer vertex ids (static numpy array).
    iterations: lambda|mu pairs (0 returns `verts`).
  """
  lead = verts.shape[:-2]
  flat = verts.reshape((-1,) + verts.shape[-2:])
  edges = one_ring_edges(faces, verts.shape[-2])  # once, not per pass
  for _ in range(int(iterations)):
    for factor in (lam, mu):
      flat = flat - factor * _laplacian(flat, edges)
  return flat.reshape(lead + verts.shape[-2:])


def boundary_loops(faces):
  """Boundary loops of an oriented triangle mesh: edges used by exactly one face.

  Args:
    faces: [F, 3] vertex ids, consistently oriented.

  Returns:
    list of loops, each a list of vertex ids in order around the hole.
  """
  directed = [
      (int(u), int(v)) for face in np.asarray(faces) for u, v in zip(face, np.roll(face, -1))
  ]
  uses = collections.Counter((min(edge), max(edge)) for edge in directed)
  # On a boundary edge u -> v of a face, the hole lies on the other side: walk v -> u.
  step = {v: u for u, v in directed if uses[(min(u, v), max(u, v))] == 1}
  loops, seen = [], set()
  for start in step:
    loop, v = [], start
    while v not in seen:
      seen.add(v)
      loop.append(v)
      v = step[v]
    if loop:
      loops.append(loop)
  return loops


def _checked_numpy(vertices, faces):
  vertices = checks.check_array('vertices', vertices, ('V', 3), dtype=np.float64)
  return vertices, check_faces(faces, len(vertices))


def save_obj(path, vertices, faces):
  """Writes a Wavefront .obj (1-based face indices).

  Args:
    path: output file.
    vertices: [V, 3].
    faces: [F, 3] 0-based vertex ids.
  """
  vertices, faces = _checked_numpy(vertices, faces)
  with open(os.fspath(path), 'w') as f:
    f.writelines(f'v {x:.9g} {y:.9g} {z:.9g}\n' for x, y, z in vertices)
    f.writelines(f'f {a + 1} {b + 1} {c + 1}\n' for a, b, c in faces)


def save_ply(path, vertices, faces):
  """Writes an ASCII .ply with float vertices and triangle faces.

  Args:
    path: output file.
    vertices: [V, 3].
    faces: [F, 3] 0-based vertex ids.
  """
  vertices, faces = _checked_numpy(vertices, faces)
  header = [
      'ply',
      'format ascii 1.0',
      f'element vertex {len(vertices)}',
      'property float x',
      'property float y',
      'property float z',
      f'element face {len(faces)}',
      'property list uchar int vertex_indices',
      'end_header',
  ]
  with open(os.fspath(path), 'w') as f:
    f.write('\n'.join(header) + '\n')
    f.writelines(f'{x:.9g} {y:.9g} {z:.9g}\n' for x, y, z in vertices)
    f.writelines(f'3 {a} {b} {c}\n' for a, b, c in faces)
