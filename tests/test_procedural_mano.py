"""The procedural MANO-format hand: topology, orientation, sizes, weights, joints, blend shapes."""

import collections

import jax
import numpy as np
import pytest

from diffhand_jax import mano
from diffhand_jax import procedural_mano

TIP_OF = {'thumb': 744, 'index': 320, 'middle': 443, 'ring': 555, 'pinky': 672}
# MANO joints per digit, base to end, and the digit each joint belongs to.
CHAINS = {
    'index': (1, 2, 3),
    'middle': (4, 5, 6),
    'pinky': (7, 8, 9),
    'ring': (10, 11, 12),
    'thumb': (13, 14, 15),
}
forward = jax.jit(mano.mano_forward, static_argnames=('flat_hand_mean',))


@pytest.fixture(scope='module')
def model():
  return procedural_mano.procedural_hand(0)


@pytest.fixture(scope='module')
def joints(model):
  return model.J_regressor @ model.v_template


def edge_faces(faces):
  """undirected edge -> number of faces; directed edge -> count."""
  undirected, directed = collections.Counter(), collections.Counter()
  for face in faces:
    for a, b in zip(face, np.roll(face, -1)):
      undirected[(min(a, b), max(a, b))] += 1
      directed[(a, b)] += 1
  return undirected, directed


def test_counts_and_shapes(model):
  assert model.v_template.shape == (778, 3) and model.faces.shape == (1538, 3)
  assert model.shapedirs.shape == (778, 3, 10) and model.posedirs.shape == (778, 3, 135)
  assert model.J_regressor.shape == (16, 778) and model.weights.shape == (778, 16)
  assert model.hands_mean.shape == (45,) and model.hands_components.shape == (45, 45)
  assert model.faces.dtype == np.int32
  np.testing.assert_array_equal(
      model.parents, [-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14]
  )
  assert len(np.unique(model.faces)) == 778  # every vertex is used


def test_manifold_open_only_at_a_16_vertex_wrist_loop(model):
  undirected, directed = edge_faces(model.faces)
  counts = collections.Counter(undirected.values())
  assert set(counts) == {1, 2}, counts  # interior edges in exactly two faces
  assert max(directed.values()) == 1  # consistent orientation: no directed edge twice
  boundary = [e for e, n in undirected.items() if n == 1]
  assert len(boundary) == 16
  # The boundary edges form one cycle through 16 distinct vertices.
  neighbours = collections.defaultdict(list)
  for a, b in boundary:
    neighbours[a].append(b)
    neighbours[b].append(a)
  assert len(neighbours) == 16 and all(len(n) == 2 for n in neighbours.values())
  start = boundary[0][0]
  previous, current, visited = None, start, []
  while True:
    visited.append(current)
    step = [n for n in neighbours[current] if n != previous][0]
    previous, current = current, step
    if current == start:
      break
  assert len(visited) == 16
  # A disc: Euler characteristic V - E + F = 1, so the closed surface is a sphere.
  assert 778 - len(undirected) + 1538 == 1
  # Every vertex's faces form a single fan (no pinched vertices).
  faces_of = collections.defaultdict(list)
  for face in model.faces:
    for v in face:
      faces_of[v].append(face)
  for v in range(778):
    around = faces_of[v]
    links = [tuple(u for u in f if u != v) for f in around]
    graph = collections.defaultdict(set)
    for a, b in links:
      graph[a].add(b)
      graph[b].add(a)
    seen, stack = set(), [links[0][0]]
    while stack:
      u = stack.pop()
      if u not in seen:
        seen.add(u)
        stack.extend(graph[u] - seen)
    assert seen == set(graph), f'vertex {v} is pinched'


def test_outward_orientation(model, joints):
  vertices = model.v_template.astype(np.float64)
  undirected, _ = edge_faces(model.faces)
  loop = sorted({v for e, n in undirected.items() if n == 1 for v in e})
  centre = vertices[loop].mean(0)
  # Signed volume with the wrist hole closed by a fan from its centre (the fan's faces add
  # nothing: they contain the origin-shifted centre, so shift everything there).
  shifted = vertices - centre
  volume = (
      np.einsum(
          'fi,fi->f',
          shifted[model.faces[:, 0]],
          np.cross(shifted[model.faces[:, 1]], shifted[model.faces[:, 2]]),
      ).sum()
      / 6
  )
  assert 1.5e-4 < volume < 5e-4  # m^3: a hand is a few hundred cm^3

  # Face normals point away from the nearest bone of the skeleton (joints + tips).
  tips = {name: vertices[vertex] for name, vertex in TIP_OF.items()}
  segments = []
  for name, chain in CHAINS.items():
    points = [joints[0]] + [joints[j] for j in chain] + [tips[name]]
    segments += list(zip(points[:-1], points[1:]))
  corners = vertices[model.faces]
  centroids = corners.mean(1)
  normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
  outward = 0
  for centroid, normal in zip(centroids, normals):
    best = None
    for a, b in segments:
      t = np.clip(np.dot(centroid - a, b - a) / np.dot(b - a, b - a), 0.0, 1.0)
      nearest = a + t * (b - a)
      distance = np.linalg.norm(centroid - nearest)
      if best is None or distance < best[0]:
        best = (distance, nearest)
    outward += np.dot(normal, centroid - best[1]) > 0
  assert outward / len(centroids) > 0.97, outward


@pytest.mark.parametrize('seed', [0, 5])
def test_no_folded_triangles(seed):
  """Neighbouring faces never fold back onto each other (creases at webs stay < 140 deg)."""
  model = procedural_mano.procedural_hand(seed)
  corners = model.v_template.astype(np.float64)[model.faces]
  normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
  assert np.linalg.norm(normals, axis=1).min() > 1e-9  # no degenerate faces
  normals /= np.linalg.norm(normals, axis=1, keepdims=True)
  faces_of_edge = collections.defaultdict(list)
  for f, face in enumerate(model.faces):
    for a, b in zip(face, np.roll(face, -1)):
      faces_of_edge[(min(a, b), max(a, b))].append(f)
  pairs = np.array([f for f in faces_of_edge.values() if len(f) == 2])
  cosines = np.einsum('ij,ij->i', normals[pairs[:, 0]], normals[pairs[:, 1]])
  assert np.degrees(np.arccos(np.clip(cosines, -1, 1))).max() < 140.0
  assert np.median(cosines) > np.cos(np.radians(10.0))  # mostly smooth


def test_size_is_mano_like(model, joints):
  vertices = model.v_template
  wrist_to_middle_tip = np.linalg.norm(vertices[443] - joints[0])
  assert 0.17 < wrist_to_middle_tip < 0.20
  # Palm width: across the knuckle row of the four fingers (thumb vertices excluded).
  dominant = model.weights.argmax(1)
  palm = (vertices[:, 0] > joints[7, 0] - 0.015) & (vertices[:, 0] < joints[4, 0]) & (dominant < 13)
  width = np.ptp(vertices[palm, 2])
  assert 0.075 < width < 0.095, width
  # The wrist joint sits at the opening, the fingers point +x, the thumb is on +z.
  assert np.linalg.norm(joints[0]) < 0.01
  assert all(vertices[TIP_OF[name], 0] > 0.13 for name in ('index', 'middle', 'ring', 'pinky'))
  assert (
      vertices[744, 2] > vertices[320, 2] > vertices[443, 2] > vertices[555, 2] > (vertices[672, 2])
  )


def test_tips_are_the_extreme_vertices_of_their_digits(model, joints):
  dominant = model.weights.argmax(1)
  for name, chain in CHAINS.items():
    distal = chain[-1]
    direction = model.v_template[TIP_OF[name]] - joints[distal]
    on_digit = np.flatnonzero(dominant == distal)
    assert TIP_OF[name] in on_digit
    reach = (model.v_template[on_digit] - joints[distal]) @ direction
    assert on_digit[np.argmax(reach)] == TIP_OF[name], name


def test_skinning_weights(model):
  weights = model.weights
  assert weights.min() >= 0.0
  np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)
  for name, chain in CHAINS.items():
    assert weights[TIP_OF[name], chain[-1]] > 0.95, name
  # Smooth falloff: some vertices share two bones at every joint.
  for joint in range(1, 16):
    parent = model.parents[joint]
    shared = (weights[:, joint] > 0.2) & (weights[:, parent] > 0.2)
    assert shared.sum() >= 5, joint


def test_joint_regressor_reproduces_the_designed_skeleton(joints):
  """J_regressor @ v_template lands on the joints the hand was designed around."""
  # The same draw of the seed's sizes that build_procedural_hand(0) makes first.
  chains = procedural_mano._skeleton(np.random.default_rng(0))  # pylint: disable=protected-access
  designed = procedural_mano._joint_positions(chains, joints[0])  # pylint: disable=protected-access
  np.testing.assert_allclose(joints, designed, atol=2e-6)
  for chain in chains:  # and the design is a hand: joints in order along each digit
    assert np.all(np.diff(chain.joint_s) > 0.015) and chain.length > chain.joint_s[-1] + 0.015


def test_joint_regressor_rows_are_local_convex_weights(model, joints):
  regressor = model.J_regressor
  assert regressor.min() >= 0.0
  np.testing.assert_allclose(regressor.sum(1), 1.0, atol=1e-6)
  for j in range(16):
    support = np.flatnonzero(regressor[j] > 0)
    assert np.linalg.norm(model.v_template[support] - joints[j], axis=1).max() < 0.03, j
  # Rest fingers are straight: base, middle, end joint and tip on one line (< 0.3 mm off).
  for name, chain in CHAINS.items():
    points = np.vstack([joints[list(chain)], model.v_template[TIP_OF[name]]])
    direction = points[-1] - points[0]
    direction /= np.linalg.norm(direction)
    offsets = points - points[0]
    off_line = offsets - np.outer(offsets @ direction, direction)
    assert np.linalg.norm(off_line, axis=1).max() < 3e-4, name


def test_positive_flexion_curls_towards_the_palm(model):
  """Fingers flex about +z and the thumb about its `flexion_axes` row: tips move palmwards."""
  axes = procedural_mano.flexion_axes()
  assert axes.shape == (16, 3)
  np.testing.assert_allclose(np.linalg.norm(axes, axis=1), 1.0)
  rest, _ = forward(model, np.zeros((1, 48)), np.zeros((1, 10)), flat_hand_mean=True)
  for name, chain in CHAINS.items():
    pose = np.zeros((16, 3))
    pose[list(chain)] = 0.6 * axes[list(chain)]
    bent, _ = forward(model, pose.reshape(1, 48), np.zeros((1, 10)), flat_hand_mean=True)
    tip = TIP_OF[name]
    move = np.asarray(bent[0, tip] - rest[0, tip])
    assert np.linalg.norm(move) > 0.03, name
    if name == 'thumb':  # towards the thumb's pad, which faces the palm and the index
      assert move[1] > 0 and move[2] < 0, move
    else:  # towards the palm (+y) and back along the finger (-x)
      assert move[1] > 0.03 and move[0] < 0, (name, move)


def test_blend_shapes_and_pose_space(model):
  flat = model.shapedirs.reshape(-1, 10)
  gram = flat.T @ flat
  off_diagonal = gram - np.diag(np.diag(gram))
  assert np.abs(off_diagonal).max() < 1e-6 * np.diag(gram).max()  # orthogonal
  reach = np.linalg.norm(model.shapedirs, axis=1).max(0)  # metres per unit beta
  assert np.all(reach > 0.002) and np.all(reach < 0.02), reach
  assert 0 < np.abs(model.posedirs).max() < 0.005
  np.testing.assert_allclose(
      model.hands_components @ model.hands_components.T, np.eye(45), atol=1e-5
  )
  per_joint = np.linalg.norm(model.hands_mean.reshape(15, 3), axis=1)
  assert np.all(per_joint > 0.05) and np.all(per_joint < 0.4), per_joint


def test_deterministic_in_seed(model):
  again = procedural_mano.build_procedural_hand(0)
  for name in ('v_template', 'shapedirs', 'posedirs', 'J_regressor', 'weights', 'faces'):
    np.testing.assert_array_equal(getattr(again, name), getattr(model, name))
  other = procedural_mano.build_procedural_hand(1)
  np.testing.assert_array_equal(other.faces, model.faces)
  change = np.abs(other.v_template - model.v_template).max()
  assert 1e-4 < change < 0.02  # a slightly different hand, same topology
