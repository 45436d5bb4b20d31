"""Functional sampling API: images -> hand meshes (DESIGN.md §1-2).

`sample` runs the encoder once per image, repeats its tokens over K hypotheses, and runs the
DDIM reverse process as one `lax.scan` over the decoder. Both functions are pure and can be
wrapped in `jax.jit` (model and the integer / string options static) and `jax.vmap`:

  sample_fn = jax.jit(sampling.sample, static_argnames=(
      'model', 'num_sampling_steps', 'num_hypotheses', 'aggregate'))
  out = sample_fn(model, params, images, rng, num_sampling_steps=10)

The model always runs as plain Flax/JAX here (library layers, `jax.nn.dot_product_attention`), so
every transformation works through sampling, forward-mode autodiff included.
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffhand_jax import checks
from diffhand_jax import diffusion
from diffhand_jax import mesh
from diffhand_jax.models import diffhand

AGGREGATES = ('mean', 'medoid')


def _variables(params):
  """Accepts the 'params' collection (from init_params) or a full variables dict."""
  return params if 'params' in params else {'params': params}


def _check_options(model, images, depth, intrinsics, num_sampling_steps, num_hypotheses, aggregate):
  """Raises ValueError for bad input, before anything is traced."""
  diffhand.check_images(images, depth, model.image_size)
  if images.shape[0] == 0:
    raise ValueError(f'images has a batch of 0 (shape {tuple(images.shape)}): nothing to sample')
  if not isinstance(num_sampling_steps, (int, np.integer)) or num_sampling_steps < 1:
    raise ValueError(f'num_sampling_steps must be an integer >= 1, got {num_sampling_steps!r}')
  if num_sampling_steps > model.num_timesteps:
    raise ValueError(
        f'num_sampling_steps={num_sampling_steps} exceeds the '
        f'{model.num_timesteps} training timesteps'
    )
  if not isinstance(num_hypotheses, (int, np.integer)) or num_hypotheses < 1:
    raise ValueError(f'num_hypotheses must be an integer >= 1, got {num_hypotheses!r}')
  if aggregate not in AGGREGATES:
    raise ValueError(f'aggregate must be one of {AGGREGATES}, got {aggregate!r}')
  if intrinsics is not None:
    checks.check_array('intrinsics', intrinsics, (images.shape[0], 3, 3), finite=False)


def _check_noise_scale(noise_scale):
  if not np.isfinite(noise_scale) or noise_scale < 0:
    raise ValueError(f'noise_scale must be a finite number >= 0, got {noise_scale!r}')


def _hypotheses(
    model, params, images, rng, num_sampling_steps, num_hypotheses, depth, eta, noise_scale=1.0
):
  """K meshes per image (metres, as predicted) and the camera.

  The model runs on its plain JAX path (`diffhand.plain_path`) whatever its `cpu_kernels`: the
  CPU rewrites only speed up training's backward pass, and the plain path lets callers
  differentiate the samples in either mode (`jax.jvp`, `jax.jacfwd`).

  Returns:
    hypotheses [B, K, N, 3], camera [B, 3].
  """
  model = diffhand.plain_path(model)
  variables = _variables(params)
  batch, k, n = images.shape[0], num_hypotheses, model.num_points
  tokens, embedding = model.apply(variables, images, depth, method='encode')
  camera = model.apply(variables, embedding, method='camera')
  if not model.diffusion:
    # The direct regressor: one pass from x_t = 0, t = 0; all hypotheses are that pass.
    x0 = model.apply(
        variables,
        jnp.zeros((batch, n, 3), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        tokens,
        embedding,
        method='denoise',
    )
    x0 = jnp.broadcast_to(x0[:, None], (batch, k, n, 3))
    return x0 * model.vertex_scale, camera

  # Hypotheses are batch-major: row b * K + j is hypothesis j of image b.
  tokens_k = jnp.repeat(tokens, k, axis=0)
  embedding_k = jnp.repeat(embedding, k, axis=0)
  noise_key, ddim_key = jax.random.split(rng)
  x_T = noise_scale * jax.random.normal(noise_key, (batch * k, n, 3), jnp.float32)
  schedule = diffusion.cosine_schedule(model.num_timesteps, model.cosine_s)
  timesteps = diffusion.ddim_timesteps(model.num_timesteps, num_sampling_steps)
  denoise_fn = lambda x_t, t: model.apply(
      variables, x_t, t, tokens_k, embedding_k, method='denoise'
  )
  x0 = diffusion.ddim_sample(denoise_fn, schedule, x_T, timesteps, eta, ddim_key)
  return x0.reshape(batch, k, n, 3) * model.vertex_scale, camera


def place_root(camera: jax.Array, intrinsics: jax.Array, image_size: int) -> jax.Array:
  """Root position in the camera frame from the weak-perspective camera.

  Inverts s = 2 f / (S Z_root) and t_i = (f_i X_i / Z_root + c_i - S/2) / (S/2), i = x, y,
  with f = (f_x + f_y) / 2 for the depth.

  Args:
    camera: [B, 3] (s, tx, ty).
    intrinsics: [B, 3, 3] of the S x S crop.
    image_size: S.

  Returns:
    [B, 3] root position, metres.
  """
  focal = jnp.stack([intrinsics[:, 0, 0], intrinsics[:, 1, 1]], axis=-1)
  centre = jnp.stack([intrinsics[:, 0, 2], intrinsics[:, 1, 2]], axis=-1)
  half = image_size / 2
  depth = 2 * jnp.mean(focal, axis=-1) / (image_size * camera[:, 0])
  xy = (camera[:, 1:] * half + half - centre) * depth[:, None] / focal
  return jnp.concatenate([xy, depth[:, None]], axis=-1)


def hypothesis_spread(hypotheses: jax.Array) -> jax.Array:
  """Per-vertex uncertainty: RMS distance of the K hypotheses to their mean.

  vertex_std[b, n] = sqrt(mean_k |h[b, k, n] - mean_k' h[b, k', n]|^2), in the units of the
  hypotheses (exactly 0 for K = 1). It estimates the error of the mean aggregate: were the
  hypotheses draws from the posterior, the expected squared error of their mean would be this
  spread squared (plus its own 1/K sampling term).

  Args:
    hypotheses: [B, K, N, 3] (root-relative, as `sample` returns them).

  Returns:
    [B, N].
  """
  mean = jnp.mean(hypotheses, axis=1, keepdims=True)
  return jnp.sqrt(jnp.mean(jnp.sum((hypotheses - mean) ** 2, axis=-1), axis=1))


def aggregate_hypotheses(hypotheses: jax.Array, aggregate: str = 'mean') -> jax.Array:
  """One mesh per image from K hypotheses: their mean, or their medoid.

  The medoid is the hypothesis with the smallest summed mean-vertex distance to the others.

  Args:
    hypotheses: [B, K, N, 3].
    aggregate: 'mean' or 'medoid'.

  Returns:
    [B, N, 3].
  """
  if aggregate not in AGGREGATES:
    raise ValueError(f'aggregate must be one of {AGGREGATES}, got {aggregate!r}')
  if aggregate == 'mean':
    return jnp.mean(hypotheses, axis=1)
  pairwise = jnp.mean(
      jnp.linalg.norm(hypotheses[:, :, None] - hypotheses[:, None, :], axis=-1), axis=-1
  )  # [B, K, K]
  best = jnp.argmin(jnp.sum(pairwise, axis=-1), axis=-1)
  return jnp.take_along_axis(hypotheses, best[:, None, None, None], axis=1)[:, 0]


def _check_smoothing(model, smoothing_iterations):
  if not isinstance(smoothing_iterations, (int, np.integer)) or smoothing_iterations < 0:
    raise ValueError(f'smoothing_iterations must be an integer >= 0, got {smoothing_iterations!r}')
  if smoothing_iterations and model.faces is None:
    raise ValueError(
        "smoothing_iterations > 0 needs a model built with the hand's faces "
        '(models.build_model gives them)'
    )


def _summarise(
    model, hypotheses, camera, aggregate, intrinsics, image_size, smoothing_iterations=0
):
  """Smooths and root-centres the hypotheses, aggregates them and adds joints (and camera
  placement)."""
  if smoothing_iterations:
    hypotheses = mesh.taubin_smooth(hypotheses, model.faces.array, smoothing_iterations)
  regressor = jnp.asarray(model.joint_regressor.array)
  # The decoder's mesh is root-relative only approximately; centring it on its own regressed
  # wrist makes joint 0 exactly zero, as in the ground truth.
  root = jnp.einsum('n,bknd->bkd', regressor[0], hypotheses)
  hypotheses = hypotheses - root[:, :, None, :]
  vertices = aggregate_hypotheses(hypotheses, aggregate)
  vertex_std = hypothesis_spread(hypotheses)
  out = {
      'vertices': vertices,
      'joints': jnp.einsum('jn,bnd->bjd', regressor, vertices),
      'hypotheses': hypotheses,
      'vertex_std': vertex_std,
      'camera': camera,
  }
  if intrinsics is not None:
    root = place_root(camera, intrinsics, image_size)
    out['vertices_camera'] = vertices + root[:, None]
    out['joints_camera'] = out['joints'] + root[:, None]
  return out


def sample(
    model,
    params,
    images: jax.Array,
    rng: jax.Array,
    *,
    num_sampling_steps: int = 10,
    num_hypotheses: int = 1,
    depth: Optional[jax.Array] = None,
    aggregate: str = 'mean',
    eta: float = 0.0,
    intrinsics: Optional[jax.Array] = None,
    noise_scale: float = 1.0,
    smoothing_iterations: int = 0,
) -> dict:
  """Reconstructs hand meshes: encoder once, DDIM with `num_sampling_steps` decoder steps.

  Args:
    model: from `models.build_model`.
    params: from `models.init_params` (or a {'params': ...} variables dict).
    images: [B, S, S, 3] float, ImageNet-normalised crops.
    rng: PRNG key (starting noise and eta noise).
    num_sampling_steps: DDIM steps S >= 1.
    num_hypotheses: K >= 1 independent samples per image (one encoder pass).
    depth: optional [B, S, S, 1] depth condition.
    aggregate: 'mean' or 'medoid' of the K hypotheses.
    eta: DDIM eta (0 = deterministic given the key).
    intrinsics: optional [B, 3, 3] of the crop; adds camera-frame outputs.
    noise_scale: standard deviation of the starting noise x_T (training saw 1; larger values
      spread the hypotheses, an experiment of benchmarks/uncertainty.py; smaller ones, a
      sampling temperature, start nearer the centre of the prior; 0 starts at x_T = 0).
    smoothing_iterations: Taubin lambda|mu passes over each hypothesis (`mesh.taubin_smooth`;
      static; 0 = none): removes the decoder's per-vertex output noise (issue 36).

  Returns:
    dict with 'vertices' [B, N, 3] and 'joints' [B, 21, 3] (metres, root-relative: joint 0 is
    zero), 'hypotheses' [B, K, N, 3], 'vertex_std' [B, N] (metres, RMS distance of the K
    hypotheses to their mean), 'camera' [B, 3]; with intrinsics also 'vertices_camera'
    [B, N, 3] and 'joints_camera' [B, 21, 3] (metres, camera frame).
  """
  _check_options(model, images, depth, intrinsics, num_sampling_steps, num_hypotheses, aggregate)
  _check_noise_scale(noise_scale)
  _check_smoothing(model, smoothing_iterations)
  hypotheses, camera = _hypotheses(
      model, params, images, rng, num_sampling_steps, num_hypotheses, depth, eta, noise_scale
  )
  return _summarise(
      model, hypotheses, camera, aggregate, intrinsics, images.shape[1], smoothing_iterations
  )


# ---- Test-time augmentation ----


def rotation_2d(angle_deg) -> jax.Array:
  """[2, 2] R(theta) = [[cos, -sin], [sin, cos]]."""
  theta = jnp.deg2rad(jnp.asarray(angle_deg, jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  return jnp.stack([jnp.stack([cos, -sin]), jnp.stack([sin, cos])])


def rotate_images(images: jax.Array, angle_deg: float) -> jax.Array:
  """Rotates images in-plane about their centre (bilinear, zero outside).

  Convention: content at pixel offset (u, v) = (column, row) - centre moves to R(theta) (u, v)
  (with rows pointing down, positive angles turn the content clockwise on screen). The same
  R(theta) acting on camera (x, y) is the matching 3D rotation about the optical axis when
  the principal point is the crop centre.

  Args:
    images: [B, H, W, C].
    angle_deg: rotation angle in degrees.

  Returns:
    [B, H, W, C].
  """
  _, height, width, _ = images.shape
  rows, cols = jnp.meshgrid(
      jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing='ij'
  )
  centre = jnp.array([(width - 1) / 2, (height - 1) / 2], jnp.float32)
  offsets = jnp.stack([cols, rows], axis=-1) - centre  # [H, W, 2] as (u, v)
  # Each output pixel q reads the input at R(-theta) q.
  source = offsets @ rotation_2d(angle_deg) + centre  # row vector q^T R = (R^T q)^T
  coords = [source[..., 1], source[..., 0]]

  def one_channel(channel):  # [H, W]
    return jax.scipy.ndimage.map_coordinates(channel, coords, order=1, mode='constant', cval=0.0)

  per_image = jax.vmap(one_channel, in_axes=-1, out_axes=-1)
  return jax.vmap(per_image)(images)


def tta_sample(
    model,
    params,
    images: jax.Array,
    rng: jax.Array,
    *,
    angles: Sequence[float] = (-10.0, 0.0, 10.0),
    num_sampling_steps: int = 10,
    num_hypotheses: int = 1,
    depth: Optional[jax.Array] = None,
    aggregate: str = 'mean',
    eta: float = 0.0,
    intrinsics: Optional[jax.Array] = None,
    noise_scale: float = 1.0,
    smoothing_iterations: int = 0,
) -> dict:
  """`sample` with test-time rotation augmentation.

  Every angle's rotated copy of the batch is sampled in one batched pass (one encoder call
  on A*B images); each prediction is rotated back about the camera axis (x, y by
  R(-theta)), the camera translation likewise, and all A*K hypotheses are aggregated
  together (for 'mean' that is the average over angles of the per-angle means). The camera
  is averaged over angles. 'vertex_std' then includes the spread over angles.

  Args:
    angles: in-plane rotations in degrees (`rotate_images` convention); static.
    Others as in `sample`.

  Returns:
    As `sample`, with 'hypotheses' [B, A*K, N, 3].
  """
  angles = tuple(float(a) for a in angles)
  if not angles:
    raise ValueError('tta_sample needs at least one angle')
  _check_options(model, images, depth, intrinsics, num_sampling_steps, num_hypotheses, aggregate)
  _check_noise_scale(noise_scale)
  _check_smoothing(model, smoothing_iterations)
  batch = images.shape[0]
  rotated = jnp.concatenate([rotate_images(images, a) for a in angles])
  rotated_depth = None
  if depth is not None:
    rotated_depth = jnp.concatenate([rotate_images(depth, a) for a in angles])
  hypotheses, camera = _hypotheses(
      model,
      params,
      rotated,
      rng,
      num_sampling_steps,
      num_hypotheses,
      rotated_depth,
      eta,
      noise_scale,
  )
  undo = jnp.stack([rotation_2d(-a) for a in angles])  # [A, 2, 2]
  hypotheses = hypotheses.reshape((len(angles), batch) + hypotheses.shape[1:])
  xy = jnp.einsum('aij,abknj->abkni', undo, hypotheses[..., :2])
  hypotheses = jnp.concatenate([xy, hypotheses[..., 2:]], axis=-1)
  hypotheses = jnp.moveaxis(hypotheses, 0, 1).reshape(
      (batch, -1) + hypotheses.shape[3:]
  )  # [B, A*K, N, 3]
  camera = camera.reshape(len(angles), batch, 3)
  translation = jnp.einsum('aij,abj->abi', undo, camera[..., 1:])
  camera = jnp.mean(jnp.concatenate([camera[..., :1], translation], axis=-1), axis=0)
  return _summarise(
      model, hypotheses, camera, aggregate, intrinsics, images.shape[1], smoothing_iterations
  )
