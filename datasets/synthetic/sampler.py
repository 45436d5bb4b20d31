"""Sampling plausible hands and cameras: articulation, shape, orientation, intrinsics, placement.

Joint limits are written per anatomical axis (flexion, abduction, twist) and turned into MANO
axis-angle vectors with axes measured on the model's own rest pose, so the sampler works for
any MANO-format hand (the real MANO_RIGHT.pkl or the procedural default):
- twist axis: the bone direction (joint -> child joint, or -> fingertip);
- flexion axis: bone x palmar direction, so a positive angle curls the digit towards the
  palm; the palmar direction is the palm normal for fingers, and for the thumb (whose pad
  faces the fingers more than the palm's normal) 0.6 palm normal + 0.8 across the palm;
- abduction axis: completes the frame (close to the palmar direction).
MANO's local joint rotations act in frames aligned with the rest pose, so a rest-pose axis is
the right axis for a joint's axis-angle whatever its parents do.

Every function takes an explicit `np.random.Generator` (no global state).
"""

import dataclasses

import numpy as np

from diffhand_jax import mano

# (low, high) radians per axis: flexion, abduction, twist. Flexion has the widest range and is
# mostly positive (towards the palm); the thumb has its own ranges.
FINGER_LIMITS = {
    'mcp': ((-0.25, 1.45), (-0.06, 0.06), (-0.1, 0.1)),
    'pip': ((0.0, 1.75), (-0.05, 0.05), (-0.06, 0.06)),
    'dip': ((-0.05, 1.3), (-0.04, 0.04), (-0.05, 0.05)),
}
THUMB_LIMITS = {
    'cmc': ((-0.35, 0.9), (-0.45, 0.6), (-0.4, 0.4)),
    'mcp': ((-0.1, 1.0), (-0.15, 0.15), (-0.1, 0.1)),
    'ip': ((-0.2, 1.3), (-0.05, 0.05), (-0.05, 0.05)),
}
# Finger spread: MCP abduction = spread * fan, |fan| = distance of the finger's base from the
# middle finger's in units of the index-middle spacing (1 index, 0 middle, 1 ring, ~2 pinky).
SPREAD_RANGE = (-0.08, 0.22)
BETA_CLIP = 2.5
# The forearm (not modelled) would hide the wrist's open end: keep the fingers from pointing
# away from the camera by more than acos(MAX_AWAY) (the wrist opening is then rarely seen).
MAX_AWAY = 0.5
DEPTH_RANGE = (0.3, 0.8)  # metres from the camera to the wrist
FOCAL_AT_224 = 500.0  # pixels for a 224-pixel image; scaled with the image size
# MANO joints (1..15) per finger in chain order (base, middle, end); thumb last.
_FINGER_CHAINS = ((1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12))
_THUMB_CHAIN = (13, 14, 15)


@dataclasses.dataclass(frozen=True)
class JointFrames:
  """Anatomical axes of the 15 articulated MANO joints, measured on the rest pose.

  Attributes:
    axes: [15, 3, 3]; axes[j - 1] rows = (flexion, abduction, twist) unit axes of MANO joint j.
    fan: [15] signed spread factor of each finger's base joint (0 elsewhere).
    forward: [3] unit direction from the wrist to the middle finger's base (rest pose).
    palm_normal: [3] unit palmar direction (out of the palm; the fingers curl towards it).
    thumb_palmar: [3] unit palmar direction of the thumb (its pad faces across the palm).
  """

  axes: np.ndarray
  fan: np.ndarray
  forward: np.ndarray
  palm_normal: np.ndarray
  thumb_palmar: np.ndarray


def _unit(v):
  return v / np.linalg.norm(v)


def joint_frames(hand_model, tip_ids=mano.TIP_VERTEX_IDS):
  """Measures flexion / abduction / twist axes of each joint on the rest (flat) pose.

  Args:
    hand_model: a `mano.ManoModel` (right hand).
    tip_ids: fingertip vertex ids (thumb, index, middle, ring, pinky).

  Returns:
    `JointFrames`.
  """
  rest = mano.joint_regressor21(hand_model, tip_ids) @ np.asarray(hand_model.v_template, np.float64)
  # For a right hand, (index base - wrist) x (pinky base - wrist) points out of the palm.
  palm_normal = _unit(np.cross(rest[5] - rest[0], rest[17] - rest[0]))
  across = rest[17] - rest[5]  # index base -> pinky base
  across = _unit(across - np.dot(across, palm_normal) * palm_normal)
  thumb_palmar = _unit(0.6 * palm_normal + 0.8 * across)
  axes = np.zeros((15, 3, 3))
  fan = np.zeros(15)
  middle_base = rest[mano.MANO_TO_FREIHAND[4]]
  spacing = np.linalg.norm(rest[mano.MANO_TO_FREIHAND[1]] - middle_base)
  for joint in range(1, 16):
    freihand = mano.MANO_TO_FREIHAND[joint]
    # In FreiHAND order a finger's joints are consecutive, so the child is the next id.
    twist = _unit(rest[freihand + 1] - rest[freihand])
    palmar = thumb_palmar if joint in _THUMB_CHAIN else palm_normal
    flexion = _unit(np.cross(twist, palmar))
    abduction = np.cross(flexion, twist)
    axes[joint - 1] = np.stack([flexion, abduction, twist])
    if any(joint == chain[0] for chain in _FINGER_CHAINS):
      # Positive abduction moves the finger towards abduction x twist; fan > 0 when that is
      # away from the middle finger, scaled by the distance between finger bases.
      fan[joint - 1] = np.dot(np.cross(abduction, twist), rest[freihand] - middle_base) / spacing
  return JointFrames(
      axes=axes,
      fan=fan,
      forward=_unit(middle_base - rest[0]),
      palm_normal=palm_normal,
      thumb_palmar=thumb_palmar,
  )


def _within(rng, limits, fraction, noise):
  """A value at `fraction` of the range plus noise (relative to the range), clipped."""
  low, high = limits
  value = low + (fraction + rng.normal(0.0, noise)) * (high - low)
  return float(np.clip(value, low, high))


def sample_articulation(rng, frames):
  """Samples the full (flat-hand-relative) axis-angle of the 15 hand joints.

  A hand-level grasp amount is shared by the fingers (hands tend to close together), each
  finger deviates from it, and the distal joints follow the proximal ones.

  Args:
    rng: numpy Generator.
    frames: `JointFrames` of the hand model.

  Returns:
    [15, 3] axis-angle per MANO joint 1..15.
  """
  angles = np.zeros((15, 3))  # (flexion, abduction, twist) per joint
  grasp = rng.uniform(0.0, 1.0) ** 1.3
  spread = rng.uniform(*SPREAD_RANGE)
  for chain in _FINGER_CHAINS:
    curl = np.clip(grasp + rng.normal(0.0, 0.25), 0.0, 1.0)
    for joint, kind in zip(chain, ('mcp', 'pip', 'dip')):
      flexion, abduction, twist = FINGER_LIMITS[kind]
      angles[joint - 1] = (
          _within(rng, flexion, curl, 0.1),
          rng.uniform(*abduction),
          rng.uniform(*twist),
      )
    angles[chain[0] - 1, 1] += spread * frames.fan[chain[0] - 1]
  thumb_curl = np.clip(grasp + rng.normal(0.0, 0.3), 0.0, 1.0)
  for joint, kind in zip(_THUMB_CHAIN, ('cmc', 'mcp', 'ip')):
    flexion, abduction, twist = THUMB_LIMITS[kind]
    angles[joint - 1] = (
        _within(rng, flexion, thumb_curl, 0.15),
        rng.uniform(*abduction),
        rng.uniform(*twist),
    )
  return np.einsum('ja,jac->jc', angles, frames.axes)


def sample_betas(rng, num_betas=mano.NUM_BETAS):
  """[num_betas] shape coefficients ~ N(0, 1), clipped to +-BETA_CLIP (no extreme hands)."""
  return np.clip(rng.normal(size=num_betas), -BETA_CLIP, BETA_CLIP)


def _random_quaternion(rng):
  """Unit quaternion (w, x, y, z), w >= 0, uniform over rotations."""
  quaternion = rng.normal(size=4)
  quaternion /= np.linalg.norm(quaternion)
  return -quaternion if quaternion[0] < 0 else quaternion


def _quaternion_to_axis_angle(quaternion):
  sin_half = np.linalg.norm(quaternion[1:])
  angle = 2.0 * np.arctan2(sin_half, quaternion[0])
  return quaternion[1:] / max(sin_half, 1e-12) * angle


def _rotate(quaternion, vector):
  """Rotates [3] `vector` by a unit quaternion: v + 2w (u x v) + 2 u x (u x v)."""
  w, u = quaternion[0], quaternion[1:]
  twice_cross = 2.0 * np.cross(u, vector)
  return vector + w * twice_cross + np.cross(u, twice_cross)


def sample_rotation(rng):
  """A uniformly distributed rotation as axis-angle [3] (angle in [0, pi])."""
  return _quaternion_to_axis_angle(_random_quaternion(rng))


def sample_hand_rotation(rng, forward, max_away=MAX_AWAY, max_tries=1000):
  """A uniform rotation conditioned on (R @ forward)_z <= max_away, as axis-angle [3].

  Rejection sampling (acceptance (1 + max_away) / 2 for a uniform direction), so the
  result stays a pure function of the generator's state.

  Args:
    rng: numpy Generator.
    forward: [3] unit wrist -> fingers direction of the model (JointFrames.forward).
    max_away: largest allowed z of the rotated direction (z points away from the camera).
    max_tries: safety bound on rejections.
  """
  for _ in range(max_tries):
    quaternion = _random_quaternion(rng)
    if _rotate(quaternion, forward)[2] <= max_away:
      return _quaternion_to_axis_angle(quaternion)
  raise ValueError(f'no rotation with (R @ forward)_z <= {max_away} in {max_tries} tries')


# Orientation of a hand held up to a camera (degrees), relative to the canonical pose:
# fingers up in the image, palm facing the camera. Yaw turns the hand about the image's
# vertical axis (BACK_PROBABILITY of hands show their back: yaw + 180), pitch tilts the
# fingers towards / away from the camera, roll turns the hand in the image plane.
HELD_YAW = 70.0
HELD_PITCH = 35.0
HELD_ROLL_STD = 40.0
HELD_ROLL_MAX = 110.0
BACK_PROBABILITY = 0.5
ORIENTATIONS = ('held', 'uniform')


def _axis_rotation(axis, degrees):
  """[3, 3] rotation by `degrees` about the unit `axis` (Rodrigues)."""
  axis = _unit(np.asarray(axis, np.float64))
  angle = np.deg2rad(degrees)
  cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
  return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


def _matrix_to_axis_angle(matrix):
  """[3, 3] rotation -> axis-angle [3] (angle in [0, pi]), via a unit quaternion."""
  w = np.sqrt(max(1.0 + np.trace(matrix), 0.0)) / 2.0
  if w > 1e-6:
    xyz = np.array(
        [matrix[2, 1] - matrix[1, 2], matrix[0, 2] - matrix[2, 0], matrix[1, 0] - matrix[0, 1]]
    ) / (4.0 * w)
  else:  # a half turn: the axis is the eigenvector of eigenvalue 1
    values, vectors = np.linalg.eigh((matrix + np.eye(3)) / 2.0)
    xyz = vectors[:, np.argmax(values)]
  quaternion = np.concatenate([[w], xyz])
  return _quaternion_to_axis_angle(quaternion / np.linalg.norm(quaternion))


def canonical_rotation(frames):
  """[3, 3] rotation taking the model's rest hand to fingers up (-y, OpenCV camera frame) with
  the palm facing the camera (palm normal -> -z)."""
  normal = frames.palm_normal
  # The middle finger's base need not lie in the wrist-index-pinky plane: use the part of
  # `forward` inside the palm plane so the source frame is orthonormal.
  forward = _unit(frames.forward - np.dot(frames.forward, normal) * normal)
  source = np.stack([forward, np.cross(normal, forward), normal])
  up, towards_camera = np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, -1.0])
  target = np.stack([up, np.cross(towards_camera, up), towards_camera])
  return target.T @ source


def sample_held_rotation(rng, frames):
  """A global orientation of a hand held up to a camera, as axis-angle [3].

  Canonical pose (`canonical_rotation`), then yaw about the camera's y axis (palm or back
  towards the camera), pitch about x, roll about the optical axis z; see HELD_*.

  Args:
    rng: numpy Generator.
    frames: `JointFrames` of the hand model.
  """
  yaw = rng.uniform(-HELD_YAW, HELD_YAW) + (180.0 if rng.uniform() < BACK_PROBABILITY else 0.0)
  pitch = rng.uniform(-HELD_PITCH, HELD_PITCH)
  roll = float(np.clip(rng.normal(0.0, HELD_ROLL_STD), -HELD_ROLL_MAX, HELD_ROLL_MAX))
  rotation = (
      _axis_rotation((0, 0, 1), roll)
      @ _axis_rotation((1, 0, 0), pitch)
      @ _axis_rotation((0, 1, 0), yaw)
      @ canonical_rotation(frames)
  )
  return _matrix_to_axis_angle(rotation)


def sample_orientation(rng, frames, kind='held'):
  """Global orientation axis-angle [3]: 'held' (`sample_held_rotation`) or 'uniform'
  (`sample_hand_rotation`: any rotation with the fingers not pointing far away)."""
  if kind == 'held':
    return sample_held_rotation(rng, frames)
  if kind == 'uniform':
    return sample_hand_rotation(rng, frames.forward)
  raise ValueError(f'unknown orientation distribution {kind!r} (known: {ORIENTATIONS})')


def sample_intrinsics(rng, image_size):
  """Pinhole K [3, 3]: focal ~500 px at 224 px (+-10%), principal point near the centre."""
  focal = FOCAL_AT_224 * image_size / 224.0 * rng.uniform(0.9, 1.1)
  center = (image_size - 1) / 2.0 + rng.uniform(-0.02, 0.02, size=2) * image_size
  return np.array([[focal, 0.0, center[0]], [0.0, focal, center[1]], [0.0, 0.0, 1.0]])


def _axis_interval(offsets, depths, focal, center, low, high):
  """Translations t along one image axis with low <= f (t + o) / d + c <= high for all points."""
  lower = np.max((low - center) * depths / focal - offsets)
  upper = np.min((high - center) * depths / focal - offsets)
  return lower, upper


def place_in_view(rng, points, K, image_size, depth_range=DEPTH_RANGE, margin=2.0):
  """Samples a translation that puts every point inside the image.

  The depth is uniform in `depth_range`, pushed back just enough when the hand would not fit;
  x and y are then uniform over all placements that keep every point `margin` pixels inside
  (for a fixed depth, u depends only on x and v only on y, so each is an exact interval).

  Args:
    rng: numpy Generator.
    points: [N, 3] points relative to the translated origin (e.g. root-relative vertices).
    K: [3, 3] intrinsics.
    image_size: image side in pixels.
    depth_range: (near, far) metres for the origin.
    margin: pixels kept free at the border.

  Returns:
    [3] translation.
  """
  low, high = margin, image_size - 1.0 - margin
  if high - low < 1.0:
    raise ValueError(f'image_size {image_size} leaves no room inside a {margin}-pixel margin')

  def intervals(depth):
    depths = depth + points[:, 2]
    x = _axis_interval(points[:, 0], depths, K[0, 0], K[0, 2], low, high)
    y = _axis_interval(points[:, 1], depths, K[1, 1], K[1, 2], low, high)
    return x, y

  def fits(depth):
    (x_lo, x_hi), (y_lo, y_hi) = intervals(depth)
    return x_lo <= x_hi and y_lo <= y_hi

  depth = rng.uniform(*depth_range)
  if not fits(depth):
    # The fit only gets easier with distance: bisect for the nearest depth that fits.
    near, far = depth, depth * 2.0
    while not fits(far):
      near, far = far, far * 2.0
    for _ in range(40):
      mid = 0.5 * (near + far)
      near, far = (near, mid) if fits(mid) else (mid, far)
    depth = far
  (x_lo, x_hi), (y_lo, y_hi) = intervals(depth)
  return np.array([rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi), depth])
