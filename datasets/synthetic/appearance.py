"""Random appearance of a synthetic example: skin, light, background texture, occluder.

The skin has regions that tell the palm from the back of the hand, as in photographs: a
lighter palm and pale fingernails on the back of the fingertips, plus a faint low-frequency
texture (`skin_regions`, `sample_vertex_albedo`).

Every function draws from an explicit `np.random.Generator`, so an example's look is a pure
function of its seed. Colours are RGB floats in [0, 1].
"""

import dataclasses

import numpy as np

from diffhand_jax import mesh

# Skin tones from light to dark (RGB albedo); a tone is interpolated between two neighbours.
SKIN_TONES = np.array(
    [
        (0.97, 0.82, 0.72),
        (0.91, 0.72, 0.60),
        (0.82, 0.62, 0.48),
        (0.68, 0.48, 0.34),
        (0.50, 0.34, 0.23),
        (0.34, 0.23, 0.16),
    ]
)
OCCLUDER_PROBABILITY = 0.3
# Sensor noise is applied to some images only: per-pixel noise makes PNGs 2-3x larger.
NOISE_PROBABILITY = 0.3


def sample_skin(rng):
  """Returns an RGB albedo [3]: a tone between two palette neighbours plus a small tint."""
  position = rng.uniform(0.0, len(SKIN_TONES) - 1)
  low = int(np.floor(position))
  high = min(low + 1, len(SKIN_TONES) - 1)
  tone = SKIN_TONES[low] + (position - low) * (SKIN_TONES[high] - SKIN_TONES[low])
  return np.clip(tone + rng.uniform(-0.03, 0.03, size=3), 0.0, 1.0)


# Palm albedo: the skin tone moved this far towards PALM_TINT (palms are lighter and pinker,
# most visibly on darker skin). Nails: moved towards NAIL_TINT.
PALM_TINT = np.array([0.96, 0.78, 0.72])
PALM_BLEND = (0.35, 0.6)
NAIL_TINT = np.array([0.98, 0.88, 0.86])
NAIL_BLEND = (0.55, 0.8)
NAIL_RADIUS = 0.009  # metres around the fingertip vertex (rest pose)
TEXTURE_AMPLITUDE = 0.08  # relative albedo variation of the skin texture


@dataclasses.dataclass(frozen=True)
class SkinRegions:
  """Per-vertex regions of a hand model, measured on its rest pose.

  Attributes:
    palm: [V] weight in [0, 1] of the palm colour (1 on the palmar side of hand and fingers).
    nail: [V] bool, fingernail vertices (the back of each fingertip).
    rest: [V, 3] rest-pose vertices (for the texture).
  """

  palm: np.ndarray
  nail: np.ndarray
  rest: np.ndarray


def skin_regions(template, faces, palm_normal, thumb_palmar, tip_ids, thumb_vertices):
  """Palm and nail regions from the rest pose's vertex normals.

  Args:
    template: [V, 3] rest-pose vertices.
    faces: [F, 3] int faces.
    palm_normal: [3] unit palmar direction of the hand and fingers.
    thumb_palmar: [3] unit palmar direction of the thumb.
    tip_ids: fingertip vertex ids, thumb first.
    thumb_vertices: [V] bool, vertices that move with the thumb (use thumb_palmar there).

  Returns:
    `SkinRegions`.
  """
  template = np.asarray(template, np.float64)
  normals = mesh.vertex_normals(template, np.asarray(faces))
  palmar = np.where(thumb_vertices[:, None], thumb_palmar, palm_normal)
  facing = np.sum(normals * palmar, axis=-1)  # +1 palmar side, -1 back
  palm = np.clip((facing + 0.1) / 0.5, 0.0, 1.0)
  nail = np.zeros(len(template), bool)
  for tip in tip_ids:
    near = np.linalg.norm(template - template[tip], axis=-1) < NAIL_RADIUS
    nail |= near & (facing < -0.4)
  return SkinRegions(palm=palm, nail=nail, rest=template)


def sample_vertex_albedo(rng, skin, regions):
  """Per-vertex albedo [V, 3] in [0, 1]: `skin` with a lighter palm, nails and a texture.

  Args:
    rng: numpy Generator.
    skin: [3] base albedo (`sample_skin`).
    regions: `SkinRegions` of the hand model.
  """
  palm_color = skin + rng.uniform(*PALM_BLEND) * (PALM_TINT - skin)
  nail_color = skin + rng.uniform(*NAIL_BLEND) * (NAIL_TINT - skin)
  albedo = skin + regions.palm[:, None] * (palm_color - skin)
  albedo[regions.nail] = nail_color
  # Texture: a few random plane waves over the rest pose (wavelengths 1-4 cm).
  waves = rng.normal(size=(4, 3))
  waves *= (2 * np.pi / rng.uniform(0.01, 0.04, size=(4, 1))) / np.linalg.norm(
      waves, axis=1, keepdims=True
  )
  phases = rng.uniform(0.0, 2 * np.pi, size=4)
  texture = np.mean(np.sin(regions.rest @ waves.T + phases), axis=1)
  return np.clip(albedo * (1.0 + TEXTURE_AMPLITUDE * texture[:, None]), 0.0, 1.0)


def sample_light(rng):
  """Returns (light_dir [3], ambient): the light is on the camera's side (negative z)."""
  direction = np.array([rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0), -rng.uniform(0.4, 1.5)])
  return direction / np.linalg.norm(direction), rng.uniform(0.25, 0.5)


def _linear_weights(size, grid):
  """Knot indices [size] and weights [size] of `grid` knots spread linearly over `size` pixels."""
  position = np.linspace(0.0, grid - 1.0, size)
  low = np.minimum(np.floor(position).astype(np.int64), grid - 2)
  return low, position - low


def smooth_noise(rng, size, grid):
  """Bilinearly upsampled random colours on a `grid` x `grid` lattice: [size, size, 3].

  Element-wise interpolation rather than two small matrix products: on a busy machine
  multi-threaded BLAS makes those 100x slower.
  """
  knots = rng.uniform(0.0, 1.0, size=(grid, grid, 3))
  low, fraction = _linear_weights(size, grid)
  fraction = fraction[:, None, None]
  rows = knots[low] * (1.0 - fraction) + knots[low + 1] * fraction  # [size, grid, 3]
  fraction = fraction[None, :, :, 0]
  return rows[:, low] * (1.0 - fraction) + rows[:, low + 1] * fraction


def _random_colors(rng, count):
  return rng.uniform(0.0, 1.0, size=(count, 3))


def _coordinates_along(rng, size):
  """Pixel coordinates projected on a random direction: [size, size], in pixels."""
  angle = rng.uniform(0.0, np.pi)
  v, u = np.mgrid[0:size, 0:size].astype(np.float64)
  return u * np.cos(angle) + v * np.sin(angle)


def _blend(colors, weight):
  """colors [2, 3], weight [H, W] in [0, 1] -> [H, W, 3]."""
  return colors[0] + weight[..., None] * (colors[1] - colors[0])


def background_texture(rng, size):
  """A random background: smooth noise, stripes, a gradient or a checkerboard.

  Args:
    rng: numpy Generator.
    size: image side in pixels.

  Returns:
    [size, size, 3] float in [0, 1].
  """
  kind = rng.integers(4)
  if kind == 0:
    # Two octaves of smooth noise: large blobs with some finer structure.
    image = 0.7 * smooth_noise(rng, size, int(rng.integers(2, 6))) + 0.3 * smooth_noise(
        rng, size, int(rng.integers(8, 24))
    )
  elif kind == 1:
    period = rng.uniform(0.04, 0.25) * size
    phase = _coordinates_along(rng, size) * 2 * np.pi / period
    weight = 0.5 + 0.5 * np.sin(phase)
    if rng.uniform() < 0.5:
      weight = (weight > 0.5).astype(np.float64)  # hard-edged stripes
    image = _blend(_random_colors(rng, 2), weight)
  elif kind == 2:
    along = _coordinates_along(rng, size)
    weight = (along - along.min()) / max(np.ptp(along), 1e-9)
    image = _blend(_random_colors(rng, 2), weight)
  else:
    cell = rng.uniform(0.06, 0.25) * size
    first = _coordinates_along(rng, size)
    second = _coordinates_along(rng, size)
    weight = ((np.floor(first / cell) + np.floor(second / cell)) % 2).astype(np.float64)
    image = _blend(_random_colors(rng, 2), weight)
  # Mix with a faint smooth noise so no background is perfectly flat.
  image = 0.85 * image + 0.15 * smooth_noise(rng, size, int(rng.integers(3, 9)))
  return np.clip(image, 0.0, 1.0)


def occluder_mask(rng, size, mask):
  """Maybe draws an occluder shape over part of the hand.

  With probability OCCLUDER_PROBABILITY returns a boolean [size, size] ellipse or rotated
  rectangle centred on a random hand pixel, sized 15-40% of the hand's bounding box; else None.

  Args:
    rng: numpy Generator.
    size: image side in pixels.
    mask: [size, size] bool, the hand's pixels.
  """
  if rng.uniform() >= OCCLUDER_PROBABILITY or not mask.any():
    return None
  rows, cols = np.nonzero(mask)
  pick = rng.integers(len(rows))
  center = np.array([cols[pick], rows[pick]], dtype=np.float64)
  extent = max(np.ptp(rows), np.ptp(cols), 4)
  half = rng.uniform(0.075, 0.2, size=2) * extent
  angle = rng.uniform(0.0, np.pi)
  v, u = np.mgrid[0:size, 0:size].astype(np.float64)
  du, dv = u - center[0], v - center[1]
  a = (du * np.cos(angle) + dv * np.sin(angle)) / half[0]
  b = (-du * np.sin(angle) + dv * np.cos(angle)) / half[1]
  if rng.uniform() < 0.5:
    return a**2 + b**2 <= 1.0
  return (np.abs(a) <= 1.0) & (np.abs(b) <= 1.0)


def occluder_texture(rng, size):
  """A plain colour with smooth shading: [size, size, 3] in [0, 1]."""
  base = _random_colors(rng, 1)[0]
  shading = 0.75 + 0.25 * smooth_noise(rng, size, 3).mean(axis=-1, keepdims=True)
  return np.clip(base * shading, 0.0, 1.0)


def add_noise(rng, image):
  """With probability NOISE_PROBABILITY adds Gaussian sensor noise (sigma 0.005-0.02).

  Args:
    rng: numpy Generator.
    image: [H, W, 3] float in [0, 1].

  Returns:
    [H, W, 3] float in [0, 1].
  """
  if rng.uniform() >= NOISE_PROBABILITY:
    return image
  noisy = image + rng.normal(0.0, rng.uniform(0.005, 0.02), size=image.shape)
  return np.clip(noisy, 0.0, 1.0)
