"""A CPU z-buffer renderer for triangle meshes (numpy only, no OpenGL).

Conventions (shared by every function here):
- Vertices are in the camera frame, metres: x right, y down, z forward along the optical axis
  (OpenCV). A point projects to `uv = (K @ p)[:2] / p[2]`.
- Pixel (row i, column j) has its centre at u = j, v = i (OpenCV), so `uv` from `project_points`
  can be compared with pixel indices directly.
- Colours are RGB floats in [0, 1]; images passed in and returned by the drawing helpers are
  uint8 (H, W, 3).
- Triangles are rendered two-sided; a triangle with a vertex at z <= `near` is skipped (there is
  no near-plane clipping: the meshes we draw lie well in front of the camera).
"""

from typing import NamedTuple

import numpy as np

from diffhand_jax import checks
from diffhand_jax import mesh

# FreiHAND skeleton: wrist -> each finger's base -> ... -> tip (joint order of datasets/features).
HAND_BONES = (
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 4),
    (0, 5),
    (5, 6),
    (6, 7),
    (7, 8),
    (0, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (0, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (0, 17),
    (17, 18),
    (18, 19),
    (19, 20),
)
# One colour per finger (thumb, index, middle, ring, pinky), used for bones and joints.
FINGER_COLORS = (
    (0.95, 0.25, 0.2),
    (0.95, 0.75, 0.1),
    (0.2, 0.8, 0.25),
    (0.15, 0.6, 0.95),
    (0.75, 0.3, 0.9),
)
DEFAULT_SKIN = (0.85, 0.64, 0.52)
# The light comes from the camera's side, slightly from above (-y) and the left (-x).
DEFAULT_LIGHT = (-0.3, -0.4, -1.0)
# Barycentric tolerance: pixels exactly on a shared edge are claimed by both triangles (the
# z-buffer picks one), so rounding never opens cracks between neighbours.
_INSIDE_EPS = 1e-9


class Rasterization(NamedTuple):
  """Per-pixel result of `rasterize`.

  Attributes:
    depth: [H, W] float32, metres along the optical axis of the nearest surface, 0 = empty.
    face_index: [H, W] int32, index of the visible face, -1 = empty.
    barycentric: [H, W, 3] float32, perspective-correct barycentric coordinates of the visible
      point in its face (sum to 1; zeros where empty).
  """

  depth: np.ndarray
  face_index: np.ndarray
  barycentric: np.ndarray


# ---- Input checks ----


def _check_vertices(vertices, name='vertices'):
  return checks.check_array(name, vertices, ('V', 3), dtype=np.float64)


def _check_intrinsics(K):
  return checks.check_array('K', K, (3, 3), dtype=np.float64)


def _check_size(height, width):
  if int(height) != height or int(width) != width or height < 1 or width < 1:
    raise ValueError(f'image size must be positive integers, got {height}x{width}')
  return int(height), int(width)


def _check_color(color, name='color'):
  return checks.check_array(name, color, (3,), dtype=np.float64)


def _check_image(image):
  return checks.check_array('image', image, ('H', 'W', 3), kind=np.uint8)


# ---- Geometry ----


def project_points(points, K):
  """Pinhole projection.

  Args:
    points: [N, 3] camera-frame points (z > 0).
    K: [3, 3] intrinsics.

  Returns:
    [N, 2] pixel coordinates (u, v).
  """
  points = _check_vertices(points, 'points')
  K = _check_intrinsics(K)
  homogeneous = points @ K.T
  return homogeneous[:, :2] / homogeneous[:, 2:3]


# ---- Rasterisation ----


class _ScreenTriangles(NamedTuple):
  """Screen-space setup of F faces for `rasterize`.

  Attributes:
    planes: [F, 9] float64, (a, b, c) of w_0, w_1 and 1/z, each `a u + b v + c` at pixel (u, v):
      w_k are the screen-space barycentrics of corners 0 and 1.
    inv_z: [F, 3] float64, 1/z of each corner.
    x_lo: [F] int64, first pixel column of the face's bounding box.
    y_lo: [F] int64, first pixel row of the face's bounding box.
    box_width: [F] int64, columns of the bounding box (0 when it misses the image).
    num_candidates: [F] int64, pixel centres in the bounding box (0 for skipped faces).
  """

  planes: np.ndarray
  inv_z: np.ndarray
  x_lo: np.ndarray
  y_lo: np.ndarray
  box_width: np.ndarray
  num_candidates: np.ndarray


def _screen_triangles(vertices, faces, K, height, width, near):
  """Projects every face and sets up its plane equations and pixel bounding box.

  Args:
    vertices: [V, 3] camera-frame vertices.
    faces: [F, 3] int vertex indices.
    K: [3, 3] intrinsics.
    height: image rows.
    width: image columns.
    near: faces with a vertex at z <= near are skipped (no candidates).

  Returns:
    A `_ScreenTriangles` of the F faces.
  """
  z = vertices[:, 2]
  safe_z = np.where(z > near, z, 1.0)
  uv = (vertices @ K.T)[:, :2] / safe_z[:, None]
  tri_u, tri_v = uv[faces, 0], uv[faces, 1]  # [F, 3] each
  tri_inv_z = 1.0 / safe_z[faces]  # [F, 3]
  area2 = (tri_u[:, 1] - tri_u[:, 0]) * (tri_v[:, 2] - tri_v[:, 0]) - (
      tri_u[:, 2] - tri_u[:, 0]
  ) * (tri_v[:, 1] - tri_v[:, 0])
  usable = np.all(z[faces] > near, axis=1) & (np.abs(area2) > 1e-12)
  area2 = np.where(usable, area2, 1.0)

  x_lo = np.clip(np.ceil(tri_u.min(axis=1)), 0, width).astype(np.int64)
  x_hi = np.clip(np.floor(tri_u.max(axis=1)), -1, width - 1).astype(np.int64)
  y_lo = np.clip(np.ceil(tri_v.min(axis=1)), 0, height).astype(np.int64)
  y_hi = np.clip(np.floor(tri_v.max(axis=1)), -1, height - 1).astype(np.int64)
  box_width = np.maximum(x_hi - x_lo + 1, 0)
  box_height = np.maximum(y_hi - y_lo + 1, 0)
  return _ScreenTriangles(
      planes=_plane_table(tri_u, tri_v, tri_inv_z, area2),
      inv_z=tri_inv_z,
      x_lo=x_lo,
      y_lo=y_lo,
      box_width=box_width,
      num_candidates=np.where(usable, box_width * box_height, 0),
  )


def _plane_table(tri_u, tri_v, tri_inv_z, area2):
  """The affine screen-space functions of each face as one table.

  Screen-space barycentrics are affine in the pixel position, w_k = a_k u + b_k v + c_k (edge
  functions over twice the area), and so is 1/z = sum_k w_k / z_k. One table of (a, b, c) for
  w_0, w_1 and 1/z keeps the per-candidate work to a single gather.

  Args:
    tri_u: [F, 3] corner columns u, pixels.
    tri_v: [F, 3] corner rows v, pixels.
    tri_inv_z: [F, 3] corner 1/z.
    area2: [F] twice the signed screen area (non-zero).

  Returns:
    [F, 9] float64: (a, b, c) of w_0, then of w_1, then of 1/z.
  """
  nxt, prv = [1, 2, 0], [2, 0, 1]
  coef_a = (tri_v[:, nxt] - tri_v[:, prv]) / area2[:, None]
  coef_b = (tri_u[:, prv] - tri_u[:, nxt]) / area2[:, None]
  coef_c = (tri_u[:, nxt] * tri_v[:, prv] - tri_u[:, prv] * tri_v[:, nxt]) / area2[:, None]
  return np.stack(
      [
          coef_a[:, 0],
          coef_b[:, 0],
          coef_c[:, 0],
          coef_a[:, 1],
          coef_b[:, 1],
          coef_c[:, 1],
          np.sum(coef_a * tri_inv_z, 1),
          np.sum(coef_b * tri_inv_z, 1),
          np.sum(coef_c * tri_inv_z, 1),
      ],
      axis=1,
  )


def _face_chunks(counts, max_candidates):
  """Splits faces into runs whose bounding boxes hold about max_candidates pixels or fewer.

  A run exceeds the bound only by its last face (a single face larger than the bound forms
  its own run).
  """
  before = np.cumsum(counts) - counts
  run_of_face = before // max(int(max_candidates), 1)
  bounds = np.concatenate([[0], np.flatnonzero(np.diff(run_of_face)) + 1, [len(counts)]])
  return zip(bounds[:-1].tolist(), bounds[1:].tolist())


def _candidate_pixels(triangles, start, stop):
  """Every pixel centre in the bounding boxes of faces [start, stop): N candidates.

  Args:
    triangles: a `_ScreenTriangles`.
    start: first face.
    stop: one past the last face.

  Returns:
    (face [N] int64, px [N] float64 column, py [N] float64 row), face-major.
  """
  chunk_counts = triangles.num_candidates[start:stop]
  face = np.repeat(np.arange(start, stop), chunk_counts)
  offset = np.arange(len(face)) - np.repeat(np.cumsum(chunk_counts) - chunk_counts, chunk_counts)
  row, col = np.divmod(offset, triangles.box_width[face])
  px = (triangles.x_lo[face] + col).astype(np.float64)
  py = (triangles.y_lo[face] + row).astype(np.float64)
  return face, px, py


def _covered(planes, face, px, py):
  """Keeps the candidates whose pixel centre lies in their face (edges included).

  Args:
    planes: [F, 9] the `_ScreenTriangles.planes` table.
    face: [N] int64 face of each candidate.
    px: [N] float64 pixel columns.
    py: [N] float64 pixel rows.

  Returns:
    (face, px, py, w0, w1, inv_z), each [M] for the M covered candidates: w0 and w1 the
    screen-space barycentrics of corners 0 and 1, inv_z the face's 1/z at the pixel.
  """
  coef = planes[face]
  w0 = coef[:, 0] * px + coef[:, 1] * py + coef[:, 2]
  w1 = coef[:, 3] * px + coef[:, 4] * py + coef[:, 5]
  inside = np.flatnonzero(
      (w0 >= -_INSIDE_EPS) & (w1 >= -_INSIDE_EPS) & (w0 + w1 <= 1.0 + _INSIDE_EPS)
  )
  face, w0, w1, coef = face[inside], w0[inside], w1[inside], coef[inside]
  px, py = px[inside], py[inside]
  inv_z = coef[:, 6] * px + coef[:, 7] * py + coef[:, 8]
  return face, px, py, w0, w1, inv_z


def _depth_test(best_inv_z, pixel, inv_z):
  """Updates the z-buffer and picks, per pixel, one candidate at the nearest depth so far.

  Args:
    best_inv_z: [H * W] float64 z-buffer of 1/depth (0 = empty), updated in place.
    pixel: [M] int64 flat pixel index of each candidate.
    inv_z: [M] float64 1/depth of each candidate.

  Returns:
    [P] int64 indices into the M candidates: one per pixel whose nearest surface so far is
    among them (the last on ties).
  """
  np.maximum.at(best_inv_z, pixel, inv_z)
  nearest = np.flatnonzero(inv_z == best_inv_z[pixel])
  winner = np.full(len(best_inv_z), -1, dtype=np.int64)
  np.maximum.at(winner, pixel[nearest], nearest)
  return winner[winner >= 0]


def rasterize(vertices, faces, K, height, width, *, near=1e-4, max_candidates=1 << 21):
  """Rasterises a triangle mesh with a z-buffer.

  Every face tests the pixel centres inside its screen bounding box (vectorised over all
  faces at once); 1/z is affine in screen space, so the depth of a covered pixel is the exact
  depth of the plane of its triangle along that pixel's ray.

  Args:
    vertices: [V, 3] camera-frame vertices, metres.
    faces: [F, 3] int vertex indices.
    K: [3, 3] intrinsics.
    height: image rows.
    width: image columns.
    near: faces with a vertex at z <= near are skipped.
    max_candidates: bounds the memory used at once (pixel tests per chunk of faces).

  Returns:
    A `Rasterization` (depth [H, W], face_index [H, W], barycentric [H, W, 3]).
  """
  vertices = _check_vertices(vertices)
  faces = mesh.check_faces(faces, len(vertices))
  K = _check_intrinsics(K)
  height, width = _check_size(height, width)
  triangles = _screen_triangles(vertices, faces, K, height, width, near)

  best_inv_z = np.zeros(height * width)  # 1/depth of the nearest hit so far
  face_buf = np.full(height * width, -1, dtype=np.int64)
  bary_buf = np.zeros((height * width, 3))
  for start, stop in _face_chunks(triangles.num_candidates, max_candidates):
    if not triangles.num_candidates[start:stop].any():
      continue
    face, px, py = _candidate_pixels(triangles, start, stop)
    face, px, py, w0, w1, inv_z = _covered(triangles.planes, face, px, py)
    pixel = py.astype(np.int64) * width + px.astype(np.int64)
    chosen = _depth_test(best_inv_z, pixel, inv_z)
    screen = np.stack([w0[chosen], w1[chosen], 1.0 - w0[chosen] - w1[chosen]], axis=1)
    face_buf[pixel[chosen]] = face[chosen]
    # Perspective correction: weights proportional to w_k / z_k, normalised by 1/z.
    bary_buf[pixel[chosen]] = screen * triangles.inv_z[face[chosen]] / inv_z[chosen, None]

  hit = face_buf >= 0
  depth = np.where(hit, 1.0 / np.where(hit, best_inv_z, 1.0), 0.0)
  return Rasterization(
      depth=depth.reshape(height, width).astype(np.float32),
      face_index=face_buf.reshape(height, width).astype(np.int32),
      barycentric=bary_buf.reshape(height, width, 3).astype(np.float32),
  )


# ---- Shading ----


def shade(
    raster,
    vertices,
    faces,
    *,
    color=DEFAULT_SKIN,
    light_dir=DEFAULT_LIGHT,
    ambient=0.35,
    background=None,
):
  """Lambert + ambient shading of a rasterised mesh with smooth (interpolated) normals.

  The normal is flipped towards the camera on back faces (two-sided lighting), so the
  face winding does not matter.

  Args:
    raster: a `Rasterization` of (vertices, faces).
    vertices: [V, 3] camera-frame vertices.
    faces: [F, 3] int.
    color: RGB albedo in [0, 1]: one [3] for the whole mesh, or [V, 3] per vertex
      (interpolated across each face like the normals).
    light_dir: [3] direction from the surface towards the light, camera frame.
    ambient: in [0, 1], the share of light that does not depend on the normal.
    background: [H, W, 3] uint8 or float in [0, 1]; None = black.

  Returns:
    [H, W, 3] float32 RGB in [0, 1].
  """
  vertices = _check_vertices(vertices)
  faces = mesh.check_faces(faces, len(vertices))
  color, light = _check_shading(color, light_dir, ambient, len(vertices))
  height, width = raster.face_index.shape
  if background is None:
    image = np.zeros((height, width, 3), dtype=np.float32)
  else:
    image = _background_float(background, height, width)

  mask = raster.face_index >= 0
  face = raster.face_index[mask]
  barycentric = raster.barycentric[mask]
  normal = _smooth_normals(vertices, faces, face, barycentric)
  intensity = ambient + (1.0 - ambient) * np.clip(normal @ light, 0.0, None)
  if color.ndim == 2:
    color = np.einsum('pk,pkc->pc', barycentric, color[faces[face]])
  image[mask] = (intensity[:, None] * color).astype(np.float32)
  return image


def _check_shading(color, light_dir, ambient, num_vertices):
  """Checks the lighting arguments of `shade`.

  Args:
    color: [3] or [V, 3] RGB albedo in [0, 1].
    light_dir: [3] non-zero direction towards the light.
    ambient: float in [0, 1].
    num_vertices: V.

  Returns:
    (color [3] or [V, 3] float64, light [3] float64 unit vector).
  """
  if np.ndim(color) == 2:
    color = checks.check_array('per-vertex color', color, (num_vertices, 3), dtype=np.float64)
  else:
    color = _check_color(color)
  light = checks.check_array('light_dir', light_dir, (3,), dtype=np.float64)
  if not np.any(light):
    raise ValueError(f'light_dir must be non-zero, got {light_dir!r}')
  if not 0.0 <= ambient <= 1.0:
    raise ValueError(f'ambient must be in [0, 1], got {ambient}')
  return color, light / np.linalg.norm(light)


def _smooth_normals(vertices, faces, face, barycentric):
  """Unit normals at P visible points, interpolated from the vertex normals of their faces.

  A normal is flipped towards the camera on back faces (two-sided lighting).

  Args:
    vertices: [V, 3] camera-frame vertices.
    faces: [F, 3] int.
    face: [P] int face of each point.
    barycentric: [P, 3] perspective-correct barycentric coordinates of each point.

  Returns:
    [P, 3] float64 unit normals.
  """
  corner_normals = mesh.vertex_normals(vertices, faces)[faces[face]]  # [P, 3, 3]
  normal = np.einsum('pk,pkc->pc', barycentric, corner_normals)
  normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-30)
  centroid = vertices[faces].mean(axis=1)
  towards_camera = np.sum(mesh.face_normals(vertices, faces) * -centroid, axis=1) >= 0
  normal *= np.where(towards_camera[face], 1.0, -1.0)[:, None]
  return normal


def _background_float(background, height, width):
  background = checks.check_array('background', background, (height, width, 3))
  if background.dtype == np.uint8:
    return background.astype(np.float32) / 255.0
  return np.clip(background, 0.0, 1.0).astype(np.float32)


def to_uint8(image):
  """[H, W, C] float in [0, 1] -> uint8 (rounded, clipped)."""
  return np.clip(np.round(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)


def render(
    vertices,
    faces,
    K,
    height,
    width,
    *,
    color=DEFAULT_SKIN,
    light_dir=DEFAULT_LIGHT,
    ambient=0.35,
    background=None,
):
  """Renders a mesh: shaded RGB, exact depth and mask.

  Args:
    vertices: [V, 3] camera-frame vertices, metres.
    faces: [F, 3] int.
    K: [3, 3] intrinsics.
    height: image rows.
    width: image columns.
    color, light_dir, ambient, background: see `shade`.

  Returns:
    dict with 'image' uint8 [H, W, 3], 'depth' float32 [H, W] (0 = background),
    'mask' bool [H, W] (= depth > 0), 'face_index' int32 [H, W] (-1 = background).
  """
  raster = rasterize(vertices, faces, K, height, width)
  image = shade(
      raster,
      vertices,
      faces,
      color=color,
      light_dir=light_dir,
      ambient=ambient,
      background=background,
  )
  return {
      'image': to_uint8(image),
      'depth': raster.depth,
      'mask': raster.face_index >= 0,
      'face_index': raster.face_index,
  }


# ---- Drawing on images (visualisation) ----


def overlay_mesh(
    image,
    vertices,
    faces,
    K,
    color=(0.55, 0.7, 1.0),
    alpha=0.6,
    light_dir=DEFAULT_LIGHT,
    ambient=0.35,
):
  """Blends a shaded mesh over an image (e.g. a prediction over its input).

  Args:
    image: [H, W, 3] uint8.
    vertices: [V, 3] camera-frame vertices for the intrinsics K of `image`.
    faces: [F, 3] int.
    K: [3, 3] intrinsics of `image`.
    color: RGB in [0, 1].
    alpha: opacity of the mesh in [0, 1].
    light_dir, ambient: see `shade`.

  Returns:
    [H, W, 3] uint8, a new array.
  """
  image = _check_image(image)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha must be in [0, 1], got {alpha}')
  height, width = image.shape[:2]
  raster = rasterize(vertices, faces, K, height, width)
  shaded = shade(raster, vertices, faces, color=color, light_dir=light_dir, ambient=ambient)
  mask = (raster.face_index >= 0)[..., None]
  base = image.astype(np.float32) / 255.0
  blended = np.where(mask, alpha * shaded + (1.0 - alpha) * base, base)
  return to_uint8(blended)


def _stamp_disks(image, centers, colors, radius):
  """Paints filled disks (in place). centers: [N, 2] (u, v); colors: [N, 3] in [0, 1]."""
  height, width = image.shape[:2]
  reach = int(np.ceil(radius))
  offsets = np.arange(-reach, reach + 1)
  du, dv = np.meshgrid(offsets, offsets)
  disk = (du**2 + dv**2) <= radius**2 + 1e-9
  du, dv = du[disk], dv[disk]
  # Far-away points would overflow the integer conversion; they draw nothing anyway.
  near = np.all(np.abs(centers) < 1e7, axis=1)
  centers, colors = centers[near], colors[near]
  cu = np.round(centers[:, 0]).astype(np.int64)[:, None] + du
  cv = np.round(centers[:, 1]).astype(np.int64)[:, None] + dv
  inside = (cu >= 0) & (cu < width) & (cv >= 0) & (cv < height)
  pixel_colors = np.broadcast_to(to_uint8(colors)[:, None, :], cu.shape + (3,))
  image[cv[inside], cu[inside]] = pixel_colors[inside]


def _check_points2d(points2d, name='points2d'):
  # NaN points are allowed: they draw nothing.
  return checks.check_array(name, points2d, ('N', 2), dtype=np.float64, finite=False)


def _per_point_colors(color, count):
  color = np.asarray(color, dtype=np.float64)
  if color.shape == (3,):
    color = np.broadcast_to(color, (count, 3))
  if color.shape != (count, 3):
    raise ValueError(
        f'color must be one RGB triple or one per point ({count}, 3), ' f'got {color.shape}'
    )
  return color


def draw_points(image, points2d, color=(1.0, 0.2, 0.2), radius=2.0):
  """Draws filled dots; points off the image or NaN are skipped.

  Args:
    image: [H, W, 3] uint8.
    points2d: [N, 2] pixel coordinates (u, v).
    color: RGB in [0, 1], one triple or [N, 3].
    radius: dot radius in pixels.

  Returns:
    [H, W, 3] uint8, a new array.
  """
  image = _check_image(image).copy()
  points2d = _check_points2d(points2d)
  _stamp_disks(image, points2d, _per_point_colors(color, len(points2d)), radius)
  return image


def draw_lines(image, starts, ends, color=(1.0, 1.0, 1.0), thickness=1.0):
  """Draws line segments as a dense chain of dots.

  Args:
    image: [H, W, 3] uint8.
    starts: [N, 2] (u, v).
    ends: [N, 2] (u, v).
    color: RGB in [0, 1], one triple or [N, 3].
    thickness: line width in pixels.

  Returns:
    [H, W, 3] uint8, a new array.
  """
  image = _check_image(image).copy()
  starts = _check_points2d(starts, 'starts')
  ends = _check_points2d(ends, 'ends')
  if starts.shape != ends.shape:
    raise ValueError(f'starts {starts.shape} and ends {ends.shape} differ')
  colors = _per_point_colors(color, len(starts))
  length = np.linalg.norm(ends - starts, axis=1)
  length = np.where(np.isfinite(length), length, 0.0)
  # Two samples per pixel of length leave no gaps.
  num_samples = np.minimum(np.ceil(2.0 * length).astype(np.int64) + 1, 4 * sum(image.shape))
  segment = np.repeat(np.arange(len(starts)), num_samples)
  step = np.arange(num_samples.sum()) - np.repeat(np.cumsum(num_samples) - num_samples, num_samples)
  fraction = (step / np.maximum(num_samples[segment] - 1, 1))[:, None]
  points = starts[segment] + fraction * (ends[segment] - starts[segment])
  _stamp_disks(image, points, colors[segment], max(thickness / 2.0, 0.5))
  return image


def draw_skeleton(image, joints2d, bones=HAND_BONES, thickness=2.0, joint_radius=2.5):
  """Draws a 21-joint hand skeleton, one colour per finger.

  Args:
    image: [H, W, 3] uint8.
    joints2d: [21, 2] pixel coordinates in FreiHAND order.
    bones: (parent, child) joint index pairs.
    thickness: bone width in pixels.
    joint_radius: joint dot radius in pixels.

  Returns:
    [H, W, 3] uint8, a new array.
  """
  joints2d = checks.check_array('joints2d', joints2d, (21, 2), dtype=np.float64, finite=False)
  bones = np.asarray(bones, dtype=np.int64)
  finger_of_joint = np.concatenate([[0], np.repeat(np.arange(5), 4)])
  palette = np.asarray(FINGER_COLORS)
  image = draw_lines(
      image,
      joints2d[bones[:, 0]],
      joints2d[bones[:, 1]],
      palette[finger_of_joint[bones[:, 1]]],
      thickness,
  )
  joint_colors = palette[finger_of_joint]
  joint_colors[0] = (1.0, 1.0, 1.0)
  return draw_points(image, joints2d, joint_colors, joint_radius)
