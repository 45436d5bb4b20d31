"""Tests of the CPU rasteriser against closed forms and a naive per-pixel ray caster."""

import numpy as np
import pytest
from scipy.spatial import ConvexHull

from diffhand_jax import render


def _intrinsics(focal, cx, cy):
  return np.array([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])


def _pixel_rays(K, height, width):
  """Ray directions with z = 1 through every pixel centre: [H, W, 3]."""
  v, u = np.mgrid[0:height, 0:width].astype(np.float64)
  pixels = np.stack([u, v, np.ones_like(u)], axis=-1)
  return pixels @ np.linalg.inv(K).T


def _ray_cast(vertices, faces, K, height, width):
  """Reference: Moller-Trumbore ray/triangle intersection, pixel by pixel, face by face."""
  rays = _pixel_rays(K, height, width)
  depth = np.zeros((height, width))
  face_index = np.full((height, width), -1)
  for i in range(height):
    for j in range(width):
      ray = rays[i, j]
      for f, (a, b, c) in enumerate(faces):
        p0, e1, e2 = vertices[a], vertices[b] - vertices[a], vertices[c] - vertices[a]
        pvec = np.cross(ray, e2)
        det = e1 @ pvec
        if abs(det) < 1e-15:
          continue
        tvec = -p0  # ray origin (the camera centre) minus p0
        qvec = np.cross(tvec, e1)
        beta, gamma, t = tvec @ pvec / det, ray @ qvec / det, e2 @ qvec / det
        if beta < 0 or gamma < 0 or beta + gamma > 1 or t <= 0:
          continue
        if face_index[i, j] < 0 or t < depth[i, j]:
          depth[i, j], face_index[i, j] = t, f
  return depth, face_index


def _cube(side, rotation, center):
  corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * side / 2
  quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
  faces = [(a, b, c) for a, b, c, d in quads] + [(a, c, d) for a, b, c, d in quads]
  return corners @ rotation.T + center, np.array(faces)


def _rotation(axis, angle):
  axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
  cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def test_triangle_depth_matches_plane_closed_form():
  K = _intrinsics(60.0, 20.3, 18.7)
  vertices = np.array([[-0.3, -0.25, 0.8], [0.35, -0.2, 1.6], [0.05, 0.4, 1.1]])
  raster = render.rasterize(vertices, [[0, 1, 2]], K, 40, 44)
  normal = np.cross(vertices[1] - vertices[0], vertices[2] - vertices[0])
  rays = _pixel_rays(K, 40, 44)
  expected = (normal @ vertices[0]) / (rays @ normal)  # ray(t) = t * ray has z = t
  mask = raster.face_index >= 0
  assert mask.sum() > 200
  np.testing.assert_allclose(raster.depth[mask], expected[mask], rtol=1e-6)
  assert np.all(raster.depth[~mask] == 0)


def test_tilted_plane_fills_image_with_exact_depth():
  K = _intrinsics(50.0, 15.5, 11.5)
  # A quad of the plane z = 1 + 0.3 x - 0.2 y, much larger than the view.
  xy = np.array([[-5.0, -5.0], [5.0, -5.0], [5.0, 5.0], [-5.0, 5.0]])
  vertices = np.column_stack([xy, 1.0 + 0.3 * xy[:, 0] - 0.2 * xy[:, 1]]) * 0.1
  vertices[:, 2] += 0.9
  raster = render.rasterize(vertices, [[0, 1, 2], [0, 2, 3]], K, 24, 32)
  assert np.all(raster.face_index >= 0)
  rays = _pixel_rays(K, 24, 32)
  # Plane: z = 0.9 + 0.1 + 0.3 x - 0.2 y  ->  t = 1.0 / (1 - 0.3 rx + 0.2 ry).
  expected = 1.0 / (1.0 - 0.3 * rays[..., 0] + 0.2 * rays[..., 1])
  np.testing.assert_allclose(raster.depth, expected, rtol=1e-6)


def test_matches_naive_ray_caster_on_random_triangles():
  rng = np.random.default_rng(3)
  K = _intrinsics(30.0, 12.0, 10.0)
  centers = rng.uniform([-0.3, -0.3, 0.8], [0.3, 0.3, 1.5], size=(6, 1, 3))
  vertices = (centers + rng.normal(scale=0.25, size=(6, 3, 3))).reshape(-1, 3)
  faces = np.arange(18).reshape(6, 3)
  raster = render.rasterize(vertices, faces, K, 20, 24)
  depth, face_index = _ray_cast(vertices, faces, K, 20, 24)
  assert (face_index >= 0).sum() > 100
  np.testing.assert_array_equal(raster.face_index, face_index)
  np.testing.assert_allclose(raster.depth, depth, rtol=1e-6)


def test_front_triangle_is_not_overwritten_by_one_behind():
  K = _intrinsics(40.0, 16.0, 16.0)
  front = [[-0.2, -0.2, 1.0], [0.2, -0.2, 1.0], [0.0, 0.2, 1.0]]
  back = [[-0.8, -0.8, 2.0], [0.8, -0.8, 2.0], [0.0, 0.8, 2.0]]
  for order in ((front, back), (back, front)):
    vertices = np.array(order[0] + order[1])
    raster = render.rasterize(vertices, [[0, 1, 2], [3, 4, 5]], K, 32, 32)
    front_face = 0 if order[0] is front else 1
    alone = render.rasterize(np.array(front), [[0, 1, 2]], K, 32, 32)
    covered = alone.face_index >= 0
    assert covered.sum() > 30
    assert np.all(raster.face_index[covered] == front_face)
    np.testing.assert_allclose(raster.depth[covered], 1.0, rtol=1e-6)
    behind_only = (raster.face_index >= 0) & ~covered
    np.testing.assert_allclose(raster.depth[behind_only], 2.0, rtol=1e-6)


def test_axis_aligned_cube_silhouette_is_its_front_square():
  focal, side, z_front = 100.0, 0.2, 1.0
  K = _intrinsics(focal, 31.5, 31.5)
  vertices, faces = _cube(side, np.eye(3), np.array([0.0, 0.0, z_front + side / 2]))
  raster = render.rasterize(vertices, faces, K, 64, 64)
  half = focal * side / 2 / z_front  # 10 px: pixel centres 21.5 +- 10 are not integers
  pixels_per_axis = np.sum(np.abs(np.arange(64) - 31.5) <= half)
  assert (raster.face_index >= 0).sum() == pixels_per_axis**2
  np.testing.assert_allclose(raster.depth[raster.depth > 0], z_front, rtol=1e-6)


def test_rotated_cube_silhouette_is_hull_of_projected_corners():
  K = _intrinsics(90.0, 40.2, 39.7)
  rotation = _rotation([0.3, 1.0, 0.5], 0.7)
  vertices, faces = _cube(0.3, rotation, np.array([0.02, -0.03, 1.2]))
  raster = render.rasterize(vertices, faces, K, 80, 80)
  hull = ConvexHull(render.project_points(vertices, K))
  v, u = np.mgrid[0:80, 0:80]
  centres = np.stack([u.ravel(), v.ravel()], axis=1)
  inside = np.all(centres @ hull.equations[:, :2].T + hull.equations[:, 2] <= 0, axis=1)
  np.testing.assert_array_equal(raster.face_index.ravel() >= 0, inside)
  assert abs(inside.sum() - hull.volume) < hull.area  # count ~ area (2D hull volume)


def test_perspective_correct_barycentrics_give_the_visible_point():
  K = _intrinsics(70.0, 25.0, 25.0)
  vertices = np.array([[-0.4, -0.3, 0.7], [0.5, -0.2, 2.0], [0.0, 0.45, 1.2]])
  raster = render.rasterize(vertices, [[0, 1, 2]], K, 50, 50)
  mask = raster.face_index >= 0
  points = raster.barycentric[mask] @ vertices  # [P, 3]
  np.testing.assert_allclose(points[:, 2], raster.depth[mask], rtol=1e-5)
  v, u = np.nonzero(mask)
  np.testing.assert_allclose(render.project_points(points, K), np.stack([u, v], 1), atol=1e-3)
  np.testing.assert_allclose(raster.barycentric[mask].sum(-1), 1.0, atol=1e-6)


def test_chunked_rasterisation_is_identical():
  rng = np.random.default_rng(0)
  K = _intrinsics(40.0, 16.0, 16.0)
  vertices = rng.uniform([-0.5, -0.5, 1.0], [0.5, 0.5, 2.0], size=(30, 3))
  faces = rng.integers(0, 30, size=(40, 3))
  whole = render.rasterize(vertices, faces, K, 32, 32)
  chunked = render.rasterize(vertices, faces, K, 32, 32, max_candidates=50)
  for a, b in zip(whole, chunked):
    np.testing.assert_array_equal(a, b)


def test_faces_behind_the_camera_are_skipped():
  K = _intrinsics(40.0, 16.0, 16.0)
  vertices = np.array([[-0.2, -0.2, -1.0], [0.2, -0.2, 1.0], [0.0, 0.2, 1.0]])
  raster = render.rasterize(vertices, [[0, 1, 2]], K, 32, 32)
  assert np.all(raster.face_index == -1) and np.all(raster.depth == 0)


def test_lambert_shading_of_a_plane_and_two_sided_lighting():
  K = _intrinsics(40.0, 16.0, 16.0)
  vertices = np.array([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]])
  light = np.array([0.0, 0.6, -0.8])  # unit; the plane's normal towards the camera is -z
  color, ambient = np.array([0.8, 0.5, 0.4]), 0.3
  background = np.full((32, 32, 3), 0.1, dtype=np.float32)
  expected = color * (ambient + (1 - ambient) * 0.8)
  for faces in ([[0, 1, 2], [0, 2, 3]], [[0, 2, 1], [0, 3, 2]]):
    raster = render.rasterize(vertices, faces, K, 32, 32)
    image = render.shade(
        raster,
        vertices,
        faces,
        color=color,
        light_dir=light,
        ambient=ambient,
        background=background,
    )
    np.testing.assert_allclose(
        image.reshape(-1, 3), np.broadcast_to(expected, (1024, 3)), atol=1e-6
    )


def test_light_from_behind_leaves_only_ambient():
  K = _intrinsics(40.0, 16.0, 16.0)
  vertices = np.array([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [0.0, 1.0, 1.0]])
  raster = render.rasterize(vertices, [[0, 1, 2]], K, 32, 32)
  image = render.shade(
      raster, vertices, [[0, 1, 2]], color=(1.0, 1.0, 1.0), light_dir=(0.0, 0.0, 1.0), ambient=0.25
  )
  mask = raster.face_index >= 0
  np.testing.assert_allclose(image[mask], 0.25, atol=1e-6)
  assert np.all(image[~mask] == 0)


def _sphere(count, radius, center):
  """A closed triangulated sphere: hull of a Fibonacci point set."""
  k = np.arange(count) + 0.5
  polar = np.arccos(1 - 2 * k / count)
  azimuth = np.pi * (1 + 5**0.5) * k
  points = np.stack(
      [np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], axis=1
  )
  faces = ConvexHull(points).simplices
  # Hull simplices come in either winding; make them all wind outwards.
  tri = points[faces]
  outward = (
      np.einsum(
          'fi,fi->f', np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), tri.mean(axis=1)
      )
      > 0
  )
  faces = np.where(outward[:, None], faces, faces[:, ::-1])
  return points * radius + center, faces


def test_smooth_shading_of_a_sphere_follows_its_normals():
  K = _intrinsics(200.0, 31.5, 31.5)
  center, radius = np.array([0.0, 0.0, 1.0]), 0.12
  vertices, faces = _sphere(2000, radius, center)
  light, ambient = np.array([0.48, -0.6, -0.64]), 0.2
  raster = render.rasterize(vertices, faces, K, 64, 64)
  image = render.shade(
      raster, vertices, faces, color=(1.0, 1.0, 1.0), light_dir=light, ambient=ambient
  )
  mask = raster.face_index >= 0
  # The true sphere normal at the visible point along each pixel's ray.
  rays = _pixel_rays(K, 64, 64)[mask]
  points = rays * raster.depth[mask][:, None]
  normals = (points - center) / radius
  expected = ambient + (1 - ambient) * np.clip(normals @ light, 0, None)
  assert mask.sum() > 1000
  assert np.abs(image[mask][:, 0] - expected).max() < 0.02
  assert np.abs(image[mask][:, 0] - expected).mean() < 0.003


def test_render_mask_agrees_with_depth_and_background_is_kept():
  K = _intrinsics(60.0, 24.0, 24.0)
  vertices, faces = _cube(0.2, _rotation([1.0, 1.0, 0.0], 0.5), np.array([0.0, 0.0, 1.0]))
  background = np.random.default_rng(0).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
  out = render.render(vertices, faces, K, 48, 48, background=background)
  assert out['image'].dtype == np.uint8 and out['image'].shape == (48, 48, 3)
  np.testing.assert_array_equal(out['mask'], out['depth'] > 0)
  assert 0 < out['mask'].sum() < 48 * 48
  np.testing.assert_array_equal(out['image'][~out['mask']], background[~out['mask']])


def test_overlay_mesh_blends_only_under_the_mesh():
  K = _intrinsics(60.0, 24.0, 24.0)
  vertices, faces = _cube(0.2, _rotation([0.0, 1.0, 0.2], 0.4), np.array([0.0, 0.0, 1.0]))
  image = np.random.default_rng(1).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
  mask = render.rasterize(vertices, faces, K, 48, 48).face_index >= 0
  np.testing.assert_array_equal(render.overlay_mesh(image, vertices, faces, K, alpha=0.0), image)
  opaque = render.overlay_mesh(image, vertices, faces, K, color=(1.0, 0.0, 0.0), alpha=1.0)
  np.testing.assert_array_equal(opaque[~mask], image[~mask])
  assert np.all(opaque[mask][:, 1:] == 0) and np.all(opaque[mask][:, 0] > 0)
  half = render.overlay_mesh(image, vertices, faces, K, color=(1.0, 0.0, 0.0), alpha=0.5)
  expected = np.round(0.5 * opaque[mask].astype(float) + 0.5 * image[mask])
  assert np.max(np.abs(half[mask].astype(float) - expected)) <= 1.0


def test_draw_points_and_lines():
  image = np.zeros((20, 30, 3), dtype=np.uint8)
  dots = render.draw_points(
      image, [[5.2, 6.8], [np.nan, 1.0], [100.0, 5.0], [1e30, 2.0]], (1.0, 0.0, 0.0), radius=1.0
  )
  assert np.all(image == 0)  # input untouched
  painted = np.argwhere(dots[..., 0] == 255)
  assert sorted(map(tuple, painted)) == [(6, 5), (7, 4), (7, 5), (7, 6), (8, 5)]
  line = render.draw_lines(image, [[2.0, 10.0]], [[25.0, 10.0]], (0.0, 1.0, 0.0), thickness=1.0)
  rows, cols = np.nonzero(line[..., 1])
  assert set(cols) == set(range(2, 26))
  assert set(rows) <= {9, 10, 11}


def test_draw_skeleton_colours_each_finger():
  joints = np.column_stack([np.arange(21) * 2.0 + 5.0, np.full(21, 20.0)])
  joints[1:, 1] += np.repeat(np.arange(5), 4) * 6.0 - 12.0
  image = render.draw_skeleton(np.zeros((40, 60, 3), dtype=np.uint8), joints)
  for finger in range(5):
    tip = joints[4 * finger + 4].round().astype(int)
    np.testing.assert_array_equal(
        image[tip[1], tip[0]], render.to_uint8(np.array(render.FINGER_COLORS[finger]))
    )


@pytest.mark.parametrize(
    'vertices, faces, K, error',
    [
        (np.full((3, 3), np.nan), [[0, 1, 2]], np.eye(3), 'NaN'),
        (np.ones((3, 2)), [[0, 1, 2]], np.eye(3), 'shape'),
        (np.ones((3, 3)), [[0, 1, 3]], np.eye(3), 'outside'),
        (np.ones((3, 3)), [[0.0, 1.0, 2.0]], np.eye(3), 'integer'),
        (np.ones((3, 3)), [[0, 1, 2]], np.eye(2), 'K must'),
    ],
)
def test_bad_input_raises(vertices, faces, K, error):
  with pytest.raises(ValueError, match=error):
    render.rasterize(vertices, faces, K, 8, 8)


def test_bad_image_and_size_raise():
  with pytest.raises(ValueError, match='image size'):
    render.rasterize(np.ones((3, 3)), [[0, 1, 2]], np.eye(3), 0, 8)
  with pytest.raises(ValueError, match='uint8'):
    render.draw_points(np.zeros((4, 4, 3), dtype=np.float32), [[1.0, 1.0]])
