"""The procedural right hand in exactly the MANO format (the embedded default, no downloads).

Frame (metres, the rest pose): fingers point +x, the palm faces +y (the back of the hand is
-y), the thumb is on the +z side (a right hand: x, y, z is right-handed), the wrist joint is
at the origin. A positive rotation about +z flexes a finger towards the palm (curls it), a
rotation about y spreads it; the thumb flexes about its own axis, see `flexion_axes()`.
We chose the palm side so that positive z means flexion, which we believe is also the sign
MANO's right hand uses (not checked against the real file, which we cannot download).

Surface: a closed genus-0 surface of 779 vertices is built from rings of vertices,
  wrist pole -> palm rings -> split into thumb base + palm -> palm rings -> split into the
  four finger base rings (plus three web quads) -> finger rings -> one tip vertex each,
where consecutive rings are joined by triangle strips (a + b triangles for rings of a and b
vertices). The pole has valence 16; dropping it leaves 778 vertices, 1538 faces and one
16-vertex boundary loop at the wrist (Euler: 2 * 779 - 4 - 16 = 1538). All rings run
counter-clockwise around their tube's axis, so every triangle faces outwards. Finally the
vertex order is permuted so that the fingertips are FreiHAND's tip vertices.

Entry points: `build_procedural_hand(seed)` builds the hand; `procedural_hand(seed)` is the
cached one everybody uses; `load_hand_model(config)` returns the hand a config names (this one,
or a MANO file through `mano.load_mano`).

CLI: `python -m diffhand_jax.procedural_mano OUT.pkl [--seed N]` writes the procedural hand as a
MANO file (`.pkl` in the official layout, or `.npz`).
"""

import argparse
import dataclasses
import functools
import sys

import numpy as np
import scipy.optimize

from diffhand_jax import mano
from diffhand_jax import mesh

# Finger chains in palm order (+z to -z): name, MANO joint ids (base, middle, end).
_FINGERS = (
    ('index', (1, 2, 3)),
    ('middle', (4, 5, 6)),
    ('ring', (10, 11, 12)),
    ('pinky', (7, 8, 9)),
)
_THUMB_JOINTS = (13, 14, 15)
# Target vertex ids of the tips (FreiHAND's choice).
_TIP_TARGETS = {'thumb': 744, 'index': 320, 'middle': 443, 'ring': 555, 'pinky': 672}
_FINGER_RING = 10  # vertices around a finger
_FINGER_RINGS = 10  # rings beyond the base ring, per finger
_THUMB_RINGS = 11  # rings beyond the thumb's base ring
# Palm rings: (x of the ring centre, number of vertices). Ring 3 is split into the thumb
# base (_FINGER_RING vertices) and the rest of the palm.
_LOWER_PALM = ((0.0, 16), (0.006, 24), (0.012, 32))
_SPLIT_X, _SPLIT_PALM = 0.032, 30
_UPPER_PALM = ((0.048, 33), (0.059, 38), (0.069, 40))
_SPLIT_GAP = 0.12  # fraction of the split ring's angle given to the thumb base
# Direction of the thumb at rest (CMC to tip) and the side its pad faces.
THUMB_DIRECTION = (0.88, 0.30, 0.46)
_THUMB_PALMAR = (0.0, 0.6, -0.8)
_WEB_X = 0.080  # x of the finger base rings (the webs between fingers)
_THUMB_START = 0.008  # the thumb's first ring, this far beyond its CMC joint


@dataclasses.dataclass(frozen=True)
class _Chain:
  """One digit: a straight spine at rest, rings around it.

  Attributes:
    name: 'thumb', 'index', ...
    joints: three MANO joint ids, base to end.
    base: [3] first joint (MCP for fingers, CMC for the thumb).
    frame: [3, 3] rows e_x (along the digit), e_y (palmar side), e_z = e_x x e_y.
    joint_s: [3] arc length of the three joints from `base`.
    length: arc length from `base` to the tip.
    radius: half-widths at the three joints and at the start of the tip's round cap (the
      last one is the cap's radius); the half-thickness is `flatten` times these.
    flatten: thickness / width of the cross-section.
    start: arc length of the digit's first ring (the thumb's tube leaves the palm a little
      beyond its CMC joint, which sits inside the palm).
  """

  name: str
  joints: tuple
  base: np.ndarray
  frame: np.ndarray
  joint_s: np.ndarray
  length: float
  radius: tuple
  flatten: float
  start: float = 0.0

  def point(self, s):
    return self.base + s * self.frame[0]


def _frame(direction, palmar=(0.0, 1.0, 0.0)):
  e_x = np.asarray(direction, np.float64)
  e_x /= np.linalg.norm(e_x)
  e_y = np.asarray(palmar, np.float64) - np.dot(palmar, e_x) * e_x
  e_y /= np.linalg.norm(e_y)
  return np.stack([e_x, e_y, np.cross(e_x, e_y)])


def flexion_axes():
  """[16, 3] unit axes: a positive rotation about axis k curls joint k towards the palm.

  Fingers flex about +z; the thumb about e_x x e_y of its own frame (towards its pad).
  Row 0 (the wrist) is +z too. These are the rest-frame axes MANO's axis-angle uses.
  """
  axes = np.tile([0.0, 0.0, 1.0], (mano.NUM_JOINTS, 1))
  axes[list(_THUMB_JOINTS)] = _frame(THUMB_DIRECTION, _THUMB_PALMAR)[2]
  return axes


def _skeleton(rng):
  """The five chains; `rng` adds a small per-seed variation of sizes."""

  def jitter(scale=0.03):
    return 1.0 + scale * rng.standard_normal()

  chains = []
  # name, MCP (x, z), spread angle (deg, + towards the thumb), length, PIP and DIP arc
  # length fractions, radius at the MCP and at the tip.
  specs = {
      'index': ((0.086, 0.028), 6.0, 0.086, (0.45, 0.72), (0.0100, 0.0080)),
      'middle': ((0.090, 0.006), 0.0, 0.095, (0.46, 0.74), (0.0102, 0.0082)),
      'ring': ((0.085, -0.015), -5.0, 0.089, (0.46, 0.74), (0.0097, 0.0078)),
      'pinky': ((0.077, -0.036), -11.0, 0.071, (0.45, 0.72), (0.0086, 0.0070)),
  }
  for name, joints in _FINGERS:
    (x, z), angle, length, (pip, dip), radius = specs[name]
    length *= jitter()
    angle = np.deg2rad(angle)
    x *= jitter(0.01)
    chains.append(
        _Chain(
            name=name,
            joints=joints,
            base=np.array([x, 0.0, z]),
            frame=_frame([np.cos(angle), 0.0, np.sin(angle)]),
            joint_s=np.array([0.0, pip * length, dip * length]),
            length=length,
            radius=tuple(
                np.array([1.0, 0.92, 0.86, radius[1] / radius[0]]) * radius[0] * jitter(0.02)
            ),
            flatten=0.88,
            # All finger base rings start on one plane, x = _WEB_X, so the web quads between
            # neighbours lie flat instead of bridging knuckles at different heights.
            start=(_WEB_X - x) / np.cos(angle),
        )
    )
  thumb_length = 0.095 * jitter()
  chains.append(
      _Chain(
          name='thumb',
          joints=_THUMB_JOINTS,
          base=np.array([0.018, 0.002, 0.040]),
          # The tube's cross-section frame keeps e_y on the palm's side (+y), so the base ring's
          # vertex 0 and last vertex face the palm's radial wall; the pad direction
          # (_THUMB_PALMAR) only sets the flexion axis.
          frame=_frame(THUMB_DIRECTION),
          joint_s=np.array([0.0, 0.40, 0.70]) * thumb_length,
          length=thumb_length,
          radius=tuple(np.array([0.0165, 0.0112, 0.0098, 0.0088]) * jitter(0.02)),
          flatten=0.85,
          start=_THUMB_START,
      )
  )
  return chains


# ---- Surface ----
def _superellipse_ring(center, e_y, e_z, half_z, half_y, u, power=0.7):
  """Points of a rounded-rectangle ring at parameters u in [0, 1).

  u = 0 is the +e_z extreme and u grows counter-clockwise around e_x = e_y x e_z:
  the back (-e_y) side is u in (0, 0.5), the palmar (+e_y) side u in (0.5, 1).
  """
  psi = np.pi + 2.0 * np.pi * np.asarray(u)
  cos, sin = np.cos(psi), np.sin(psi)
  along_z = -half_z * np.sign(cos) * np.abs(cos) ** power
  along_y = half_y * np.sign(sin) * np.abs(sin) ** power
  return center + along_z[:, None] * e_z + along_y[:, None] * e_y


def _uniform_u(n, offset=0.0):
  return (np.arange(n) + 0.5) / n + offset


def _zip_rings(lower, lower_u, upper, upper_u):
  """Triangle strip between two rings (lists of vertex ids), merged by ring parameter.

  Both rings run counter-clockwise around the axis pointing from lower to upper; a ring of
  one vertex (pole or tip) gives a fan. Gives len(lower) + len(upper) triangles (a fan: n).
  """

  def rotate(ids, u):
    u = np.mod(np.asarray(u, np.float64), 1.0)
    start = int(np.argmin(u))
    return list(np.roll(ids, -start)), np.append(np.roll(u, -start), u.min() + 1.0)

  lower, lu = rotate(lower, lower_u)
  upper, uu = rotate(upper, upper_u)
  a, b = len(lower), len(upper)
  faces, i, j = [], 0, 0
  while i < a or j < b:
    if (a == 1 and j >= b) or (b == 1 and i >= a):
      break  # a fan is complete after n triangles
    take_lower = b == 1 or (a > 1 and (j >= b or (i < a and lu[i + 1] <= uu[j + 1])))
    if take_lower:
      faces.append((lower[i % a], lower[(i + 1) % a], upper[j % b]))
      i += 1
    else:
      faces.append((lower[i % a], upper[(j + 1) % b], upper[j % b]))
      j += 1
  return faces


class _Builder:
  """Accumulates vertices with their chain and arc length, and faces."""

  def __init__(self):
    self.points, self.chain, self.arc, self.faces = [], [], [], []

  def add(self, points, chain=-1, arc=0.0):
    start = sum(len(p) for p in self.points)
    points = np.atleast_2d(points)
    self.points.append(points)
    self.chain.extend([chain] * len(points))
    self.arc.extend(np.broadcast_to(arc, (len(points),)).tolist())
    return list(range(start, start + len(points)))


def _digit_ring(chain, s, n, u):
  """Ring of a digit at arc length s, rounded into a hemisphere near the tip."""
  r_tip = chain.radius[-1]
  cap_start = chain.length - r_tip
  radius = np.interp(s, [*chain.joint_s, cap_start], chain.radius)
  if s > cap_start:  # hemisphere of radius r_tip ending at the tip
    radius = r_tip * np.sqrt(max(0.0, 1.0 - ((s - cap_start) / r_tip) ** 2))
  return _superellipse_ring(
      chain.point(s), chain.frame[1], chain.frame[2], radius, chain.flatten * radius, u, power=1.0
  )


def _digit_stations(chain, num_rings):
  """Arc lengths of the rings after the base ring (at `chain.start`): even, two on the cap."""
  cap_start = chain.length - chain.radius[-1]
  body = np.linspace(chain.start, cap_start, num_rings - 1)[1:]
  cap = cap_start + chain.radius[-1] * np.sin(np.deg2rad([40.0, 70.0]))
  return np.concatenate([body, cap])


def _build_tube(builder, chain_id, chain, base_ids, num_rings, u):
  """Rings of a digit from its base ring up to a tip vertex; returns the tip id."""
  previous = base_ids
  for s in _digit_stations(chain, num_rings):
    ids = builder.add(_digit_ring(chain, s, len(u), u), chain_id, s)
    builder.faces += _zip_rings(previous, u, ids, u)
    previous = ids
  tip = builder.add(chain.point(chain.length), chain_id, chain.length)
  builder.faces += _zip_rings(previous, u, tip, [0.0])
  return tip[0]


def _palm_shape(x):
  """Palm cross-section at height x: (centre z, half width, half thickness)."""
  t = np.clip(x / 0.085, 0.0, 1.0)
  center_z = -0.002 - 0.002 * t
  half_width = 0.028 + 0.0135 * np.sqrt(t)
  half_thickness = 0.018 - 0.004 * t
  return center_z, half_width, half_thickness


def _palm_ring(x, u):
  center_z, half_width, half_thickness = _palm_shape(x)
  return _superellipse_ring(
      np.array([x, 0.0, center_z]),
      np.array([0.0, 1.0, 0.0]),
      np.array([0.0, 0.0, 1.0]),
      half_width,
      half_thickness,
      u,
  )


def _build_surface(chains):
  """The closed 779-vertex surface; returns (points, faces, chain, arc, pole, tips)."""
  builder = _Builder()
  thumb_id = len(chains) - 1
  thumb = chains[thumb_id]
  pole = builder.add(np.array([-0.012, 0.0, -0.002]))
  previous, previous_u = pole, [0.0]
  for x, n in _LOWER_PALM:
    u = _uniform_u(n)
    ids = builder.add(_palm_ring(x, u))
    builder.faces += _zip_rings(previous, previous_u, ids, u)
    previous, previous_u = ids, u

  # Split ring: the palm arc (B) and the thumb's base ring (A); one web quad between.
  palm_u = _SPLIT_GAP + (1.0 - 2 * _SPLIT_GAP) * _uniform_u(_SPLIT_PALM)
  palm_ids = builder.add(_palm_ring(_SPLIT_X, palm_u))
  digit_u = _uniform_u(_FINGER_RING, offset=0.5)  # vertex 0 faces the palm, palmar side
  thumb_ids = builder.add(
      _digit_ring(thumb, thumb.start, _FINGER_RING, digit_u), thumb_id, thumb.start
  )
  split_u = np.concatenate([palm_u, 1.0 - _SPLIT_GAP + 2 * _SPLIT_GAP * _uniform_u(_FINGER_RING)])
  builder.faces += _zip_rings(previous, previous_u, palm_ids + thumb_ids, split_u)
  builder.faces += _quad(thumb_ids[-1], palm_ids[0], palm_ids[-1], thumb_ids[0])
  tips = {'thumb': _build_tube(builder, thumb_id, thumb, thumb_ids, _THUMB_RINGS, digit_u)}

  previous, previous_u = palm_ids, _uniform_u(_SPLIT_PALM)
  for x, n in _UPPER_PALM:
    u = _uniform_u(n)
    ids = builder.add(_palm_ring(x, u))
    builder.faces += _zip_rings(previous, previous_u, ids, u)
    previous, previous_u = ids, u

  # Top of the palm: the four finger base rings side by side, index at +z. A finger ring is
  # its back half (u < 0.5) then its palmar half; in the palm ring the back halves come
  # first, left to right, then the palmar halves right to left.
  half = _FINGER_RING // 2
  finger_u = _uniform_u(_FINGER_RING)
  bases = [
      builder.add(_digit_ring(chain, chain.start, _FINGER_RING, finger_u), k, chain.start)
      for k, chain in enumerate(chains[:-1])
  ]
  top = [i for ids in bases for i in ids[:half]] + [
      i for ids in reversed(bases) for i in ids[half:]
  ]
  builder.faces += _zip_rings(previous, previous_u, top, _uniform_u(len(top)))
  for left, right in zip(bases[:-1], bases[1:]):
    builder.faces += _quad(left[half - 1], right[0], right[-1], left[half])
  for k, chain in enumerate(chains[:-1]):
    tips[chain.name] = _build_tube(builder, k, chain, bases[k], _FINGER_RINGS, finger_u)

  points = np.concatenate(builder.points)
  return (
      points,
      np.asarray(builder.faces, np.int64),
      np.asarray(builder.chain),
      np.asarray(builder.arc),
      pole[0],
      tips,
  )


def _quad(a, b, c, d):
  """Two triangles of the counter-clockwise quad a, b, c, d."""
  return [(a, b, c), (a, c, d)]


def _drop_pole_and_order(points, faces, pole, tips):
  """Removes the wrist pole and permutes vertices so the tips get their MANO ids.

  Returns:
    (new_from_old [V + 1] with -1 for the pole, old_from_new [V]).
  """
  keep = [i for i in range(len(points)) if i != pole]
  targets = {_TIP_TARGETS[name]: old for name, old in tips.items()}
  rest = iter(i for i in keep if i not in targets.values())
  old_from_new = np.array([targets[n] if n in targets else next(rest) for n in range(len(keep))])
  new_from_old = -np.ones(len(points), np.int64)
  new_from_old[old_from_new] = np.arange(len(old_from_new))
  return new_from_old, old_from_new


# ---- Skinning, joints, blend shapes ----
def _smoothstep(t):
  t = np.clip(t, 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def _chain_coordinates(points, chain_ids, arcs, chains):
  """(chain, arc length) of every vertex; palm vertices take the nearest digit's axis."""
  chain_ids, arcs = chain_ids.copy(), arcs.copy()
  for v in np.flatnonzero(chain_ids < 0):
    best = None
    for k, chain in enumerate(chains):
      s = np.dot(points[v] - chain.base, chain.frame[0])
      # Distance to the first bone, whose axis extends back into the palm.
      lateral = np.linalg.norm(points[v] - chain.point(min(s, chain.joint_s[1])))
      if best is None or lateral < best[0]:
        best = (lateral, k, s)
    chain_ids[v], arcs[v] = best[1], min(best[2], 0.0)
  return chain_ids, arcs


def _skinning_weights(chain_ids, arcs, chains, faces, num_vertices, blend=0.008):
  """Weights [V, 16]: smooth steps from bone to bone along each digit, then mesh-smoothed."""
  weights = np.zeros((num_vertices, mano.NUM_JOINTS))
  for v in range(num_vertices):
    chain = chains[chain_ids[v]]
    bones = (0,) + chain.joints
    # a_k = how far the vertex is past joint k; w_k = a_k - a_{k+1} telescopes to 1.
    past = [1.0] + [_smoothstep((arcs[v] - s) / (2 * blend) + 0.5) for s in chain.joint_s]
    past.append(0.0)
    for k, bone in enumerate(bones):
      weights[v, bone] += past[k] - past[k + 1]
  # A few rounds of neighbour averaging give a smooth falloff across rings and webs.
  adjacency = _adjacency(faces, num_vertices)
  degree = adjacency.sum(1, keepdims=True)
  for _ in range(3):
    weights = 0.5 * weights + 0.5 * (adjacency @ weights) / degree
  return weights / weights.sum(1, keepdims=True)


def _adjacency(faces, num_vertices):
  adjacency = np.zeros((num_vertices, num_vertices))
  for a, b in ((0, 1), (1, 2), (2, 0)):
    adjacency[faces[:, a], faces[:, b]] = 1.0
    adjacency[faces[:, b], faces[:, a]] = 1.0
  return adjacency


def _joint_positions(chains, wrist):
  joints = np.zeros((mano.NUM_JOINTS, 3))
  joints[0] = wrist
  for chain in chains:
    for joint, s in zip(chain.joints, chain.joint_s):
      joints[joint] = chain.point(s)
  return joints


def _joint_regressor(points, joints, wrist_ring, num_nearest=24):
  """Rows of convex vertex weights that reproduce `joints` (non-negative least squares)."""
  regressor = np.zeros((mano.NUM_JOINTS, len(points)))
  regressor[0, wrist_ring] = 1.0 / len(wrist_ring)
  for j in range(1, mano.NUM_JOINTS):
    near = np.argsort(np.linalg.norm(points - joints[j], axis=1))[:num_nearest]
    prior = np.full(num_nearest, 1.0 / num_nearest)
    # Rows: position in mm, sum to one, a weak pull towards uniform weights.
    system = np.concatenate(
        [1e3 * points[near].T, 10.0 * np.ones((1, num_nearest)), 1e-2 * np.eye(num_nearest)]
    )
    target = np.concatenate([1e3 * joints[j], [10.0], 1e-2 * prior])
    weights, _ = scipy.optimize.nnls(system, target)
    regressor[j, near] = weights / weights.sum()
  return regressor


def _shape_directions(points, chain_ids, arcs, chains):
  """Ten shape blend shapes [V, 3, 10], orthogonalised, each moving ~0.5-1 cm per unit."""
  num_vertices = len(points)
  along = np.stack([chains[c].frame[0] for c in chain_ids])
  # Each digit vertex pulled back to its base plane: palm-wide fields evaluated there move
  # the digit rigidly with its base, so the fields stay continuous at the knuckles.
  spine_shift = np.stack(
      [chains[c].point(max(a, 0.0)) - chains[c].base for c, a in zip(chain_ids, arcs)]
  )
  base_points = points - spine_shift
  digit = np.clip(arcs, 0.0, None)
  radial = points - np.stack([chains[c].point(max(a, 0.0)) for c, a in zip(chain_ids, arcs)])
  on_digit = _smoothstep(arcs / 0.01)[:, None]
  is_thumb = (chain_ids == len(chains) - 1)[:, None] * 1.0
  finger_of = lambda name: (chain_ids == [c.name for c in chains].index(name))[:, None] * 1.0
  zeros = np.zeros((num_vertices, 3))
  middle_z = chains[[c.name for c in chains].index('middle')].base[2]

  def axis_field(values, axis):
    field = zeros.copy()
    field[:, axis] = values
    return field

  directions = [
      0.06 * points,  # overall size
      0.10 * digit[:, None] * along * (1.0 - is_thumb),  # finger length
      axis_field(0.12 * base_points[:, 2], 2),  # palm width
      axis_field(0.07 * np.clip(base_points[:, 0], 0.0, None), 0),  # palm length
      0.15 * radial * on_digit,  # digit thickness
      0.10 * digit[:, None] * along * is_thumb,  # thumb length
      0.10 * digit[:, None] * along * (finger_of('index') - finger_of('ring')),
      0.12 * digit[:, None] * along * finger_of('pinky'),  # pinky length
      axis_field(0.20 * points[:, 1] * (1.0 - on_digit[:, 0]), 1),  # palm thickness
      axis_field(2.5 * digit * (base_points[:, 2] - middle_z), 2),  # finger spread
  ]
  flat = np.stack([d.reshape(-1) for d in directions], axis=1)
  norms = np.linalg.norm(flat, axis=0)
  q, r = np.linalg.qr(flat)
  q *= np.sign(np.diag(r))  # keep each direction's sign
  return (q * norms).reshape(num_vertices, 3, len(directions))


def _pose_directions(points, faces, weights, parents, rng):
  """Pose correctives [V, 3, 135]: a bulge on the back of bent joints + tiny smooth noise."""
  normals = mesh.vertex_normals(points, faces)
  posedirs = np.zeros((len(points), 3, (mano.NUM_JOINTS - 1) * 9))
  back = (normals[:, 1] < 0).astype(np.float64)  # the back of the hand is -y
  for joint in range(1, mano.NUM_JOINTS):
    # Vertices shared by a joint's bone and its parent's bone sit at the joint.
    region = np.clip(4.0 * weights[:, joint] * weights[:, parents[joint]], 0.0, 1.0)
    bulge = (0.0015 * region * back)[:, None] * normals
    column = (joint - 1) * 9
    # (R - I)[0,0] and [1,1] are cos(angle) - 1 for a flexion about z: -1 at 90 degrees.
    posedirs[:, :, column + 0] -= 0.5 * bulge
    posedirs[:, :, column + 4] -= 0.5 * bulge
    noise = 2e-4 * rng.standard_normal(9)
    posedirs[:, :, column : column + 9] += (region[:, None] * normals)[:, :, None] * noise
  return posedirs


def _hands_mean(rng):
  """A relaxed hand: slight flexion of every finger joint, the thumb a little opposed."""
  mean = np.zeros((mano.NUM_JOINTS - 1, 3))
  for _, (base, middle, end) in _FINGERS:
    mean[base - 1] = [0.0, 0.0, 0.15]
    mean[middle - 1] = [0.0, 0.0, 0.25]
    mean[end - 1] = [0.0, 0.0, 0.15]
  mean[12] = [0.10, -0.10, 0.10]
  mean[13] = [0.0, 0.0, 0.15]
  mean[14] = [0.0, 0.0, 0.15]
  return (mean + 0.02 * rng.standard_normal(mean.shape)).reshape(-1)


def build_procedural_hand(seed=0):
  """Builds the procedural MANO-format right hand (seconds; use the cached `procedural_hand`).

  Args:
    seed: int; the seed varies sizes by a few percent and the small random parts.

  Returns:
    A `mano.ManoModel` (778 vertices, 1538 faces, 16 joints, MANO's kinematic tree).
  """
  rng = np.random.default_rng(seed)
  chains = _skeleton(rng)
  points, faces, chain_ids, arcs, pole, tips = _build_surface(chains)
  if len(points) != mano.NUM_VERTICES + 1:
    raise RuntimeError(f'built {len(points)} vertices, expected {mano.NUM_VERTICES + 1}')
  new_from_old, old_from_new = _drop_pole_and_order(points, faces, pole, tips)
  faces = faces[~np.any(faces == pole, axis=1)]
  faces = new_from_old[faces]
  points, chain_ids, arcs = points[old_from_new], chain_ids[old_from_new], arcs[old_from_new]
  chain_ids, arcs = _chain_coordinates(points, chain_ids, arcs, chains)

  boundary = mesh.boundary_loops(faces)
  if len(boundary) != 1 or len(boundary[0]) != 16:
    raise RuntimeError('the wrist opening must be one 16-vertex loop')
  wrist = points[boundary[0]].mean(0)
  joints = _joint_positions(chains, wrist)
  parents = np.asarray(mano.MANO_PARENTS)
  weights = _skinning_weights(chain_ids, arcs, chains, faces, len(points))
  regressor = _joint_regressor(points, joints, boundary[0])
  return mano.make_model(
      {
          'v_template': points,
          'shapedirs': _shape_directions(points, chain_ids, arcs, chains),
          'posedirs': _pose_directions(points, faces, weights, parents, rng),
          'J_regressor': regressor,
          'weights': weights,
          'parents': parents,
          'faces': faces,
          'hands_mean': _hands_mean(rng),
          'hands_components': np.linalg.qr(rng.standard_normal((45, 45)))[0].T,
      }
  )


@functools.lru_cache(maxsize=4)
def procedural_hand(seed=0):
  """`build_procedural_hand(seed)`, built once per seed (the model's arrays are read-only)."""
  return build_procedural_hand(seed)


def load_hand_model(config):
  """The hand of an experiment config: `procedural_hand(config.mano_seed)` when
  `config.mano_path` is empty, else `mano.load_mano(config.mano_path)`."""
  if not config.mano_path:
    return procedural_hand(int(config.mano_seed))
  return mano.load_mano(config.mano_path)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m diffhand_jax.procedural_mano',
      description='Writes the procedural hand as a MANO file.',
  )
  parser.add_argument('out', help='output path (.pkl official layout, or .npz)')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  mano.save_mano(procedural_hand(args.seed), args.out)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main(sys.argv[1:])
