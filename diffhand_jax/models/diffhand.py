"""The DiffHand model: image encoder + camera head + x0-predicting mesh decoder.

`build_model(config)` returns a hashable Flax module (usable as a static jit argument);
`init_params(model, rng, images)` its parameters. Use with
`model.apply({'params': params}, ..., method=...)`; see docs/ARCHITECTURE.md "Model".
"""

import hashlib
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffhand_jax import checks
from diffhand_jax import mano
from diffhand_jax import procedural_mano
from diffhand_jax.models import decoder as decoder_lib
from diffhand_jax.models import encoder as encoder_lib
from diffhand_jax.models import layers

# Initial weak-perspective scale (normalised image units per metre). The crop side is
# `crop_margin` (1.4) x the 2D extent of the joints, so s ~ 2 / (1.4 x extent in metres);
# on synthetic hands (sample_geometry) that is 7.7 / 9.8 / 15.6 at the 5 / 50 / 95th
# percentile.
INITIAL_CAMERA_SCALE = 10.0

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class StaticArray:
  """A read-only numpy array that hashes by value, for static fields of a jit-static module.

  The hash is computed once, so a jit cache lookup does not rehash the array every call.
  """

  def __init__(self, array):
    array = np.array(array)  # a private copy
    array.setflags(write=False)
    self._array = array
    self._hash = hash((array.shape, array.dtype.str, hashlib.sha1(array.tobytes()).hexdigest()))

  @property
  def array(self) -> np.ndarray:
    return self._array

  @property
  def shape(self):
    return self._array.shape

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return (
        isinstance(other, StaticArray)
        and self._hash == other._hash
        and self._array.shape == other._array.shape
        and np.array_equal(self._array, other._array)
    )

  def __repr__(self):
    return f'StaticArray(shape={self._array.shape}, dtype={self._array.dtype})'


def compute_dtype(name: str):
  """'float32' | 'bfloat16' -> the jnp dtype of the computation (params stay float32)."""
  if name not in _DTYPES:
    raise ValueError(f'model.dtype must be one of {tuple(_DTYPES)}, got {name!r}')
  return _DTYPES[name]


def check_images(
    images: jax.Array, depth: Optional[jax.Array] = None, image_size: Optional[int] = None
):
  """Raises ValueError unless images is float [B, H, W, 3] and depth None or [B, H, W, 1].

  Concrete (untraced) inputs must also be finite (`checks.check_array`). With `image_size`,
  H = W = image_size (the input size the model was built and trained for).
  """
  height, width = ('height', 'width') if image_size is None else (image_size, image_size)
  checks.check_array('images', images, ('batch', height, width, 3), kind=jnp.floating)
  if depth is not None:
    checks.check_array('depth', depth, tuple(images.shape[:3]) + (1,), kind=jnp.floating)


class JointHead(nn.Module):
  """The 21 root-relative joints regressed from the image embedding alone (DESIGN §5, L_aux).

  It gives the encoder a direct 3D signal that does not pass through the decoder.

  Attributes:
    num_joints: joints to predict (21).
    dtype: computation dtype.
  """

  num_joints: int = 21
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, embedding: jax.Array) -> jax.Array:
    """Args: embedding: [B, D]. Returns: [B, num_joints, 3] float32, diffusion space."""
    hidden = nn.gelu(layers.dense(embedding.shape[-1], self.dtype, 'hidden')(embedding))
    out = layers.dense(self.num_joints * 3, self.dtype, 'out')(hidden)
    return out.astype(jnp.float32).reshape(-1, self.num_joints, 3)


class DiffHand(nn.Module):
  """Encoder + camera head + decoder. All fields are hashable.

  Attributes:
    encoder: module (images [B,H,W,3], depth=None) -> (tokens [B,P,D], embedding [B,D]).
    decoder: `decoder.Decoder` working in diffusion space (vertices / vertex_scale).
    joint_regressor: [21, N] `mano.joint_regressor21` of the template hand (joints = R @ V).
    vertex_scale: metres per unit of the diffusion variable.
    diffusion: False = direct regressor (`__call__` uses x_t = 0, t = 0).
    num_timesteps: T of the training schedule.
    cosine_s: offset s of the cosine schedule.
    aux_head: a `JointHead` (DESIGN §5, L_aux) on the image embedding, or None.
    dtype: computation dtype of the camera and auxiliary heads.
    image_size: S of the [B, S, S, 3] crops the model is built for (config.data.image_size);
      `sampling.sample` refuses other sizes. None: not recorded (any size).
    faces: [F, 3] the hand model's triangles (for `sampling.sample`'s mesh smoothing), or None.
  """

  encoder: nn.Module
  decoder: decoder_lib.Decoder
  joint_regressor: StaticArray
  vertex_scale: float = 0.1
  diffusion: bool = True
  num_timesteps: int = 1000
  cosine_s: float = 0.008
  aux_head: Optional[nn.Module] = None
  dtype: Any = jnp.float32
  image_size: Optional[int] = None
  faces: Optional[StaticArray] = None

  @property
  def num_points(self) -> int:
    return self.decoder.num_points

  def encode(self, images: jax.Array, depth: Optional[jax.Array] = None):
    """Image encoder, once per image.

    Args:
      images: [B, H, W, 3] float, ImageNet-normalised.
      depth: optional [B, H, W, 1] root-relative depth.

    Returns:
      tokens [B, P, D], embedding [B, D].
    """
    check_images(images, depth)
    tokens, embedding = self.encoder(images, depth)
    return tokens, embedding

  def denoise(
      self, x_t: jax.Array, t: jax.Array, tokens: jax.Array, embedding: jax.Array
  ) -> jax.Array:
    """Decoder step: x0_hat [B, N, 3] (float32, diffusion space) from x_t [B, N, 3], t [B]."""
    return self.decoder(x_t, t, tokens, embedding)

  @nn.compact
  def camera(self, embedding: jax.Array) -> jax.Array:
    """Weak-perspective camera (s, tx, ty) with uv_norm = s * X[..., :2] + t.

    s = INITIAL_CAMERA_SCALE * exp(raw): positive, and about INITIAL_CAMERA_SCALE at
    initialisation (small kernel, zero bias), where it is scale-equivariant to learn.

    Args:
      embedding: [B, D].

    Returns:
      [B, 3] float32.
    """
    raw = layers.dense(3, self.dtype, 'camera_head')(embedding).astype(jnp.float32)
    scale = INITIAL_CAMERA_SCALE * jnp.exp(raw[:, :1])
    return jnp.concatenate([scale, raw[:, 1:]], axis=-1)

  def aux_joints(self, embedding: jax.Array) -> jax.Array:
    """Auxiliary head (`JointHead`): [B, D] -> [B, 21, 3] float32 joints, diffusion space."""
    if self.aux_head is None:
      raise ValueError('this model has no auxiliary joint head (config.model.aux_head=False)')
    return self.aux_head(embedding)

  def __call__(
      self, images: jax.Array, x_t: jax.Array, t: jax.Array, depth: Optional[jax.Array] = None
  ):
    """Training forward pass.

    Args:
      images: [B, H, W, 3].
      x_t: [B, N, 3] noisy vertices in diffusion space (ignored when not diffusion).
      t: [B] int timesteps (ignored when not diffusion).
      depth: optional [B, H, W, 1].

    Returns:
      {'x0': [B, N, 3] float32 diffusion space, 'camera': [B, 3] float32, and with aux_head
      'aux_joints': [B, 21, 3] float32 diffusion space}.
    """
    tokens, embedding = self.encode(images, depth)
    if not self.diffusion:
      x_t, t = jnp.zeros_like(x_t), jnp.zeros_like(t)
    out = {'x0': self.denoise(x_t, t, tokens, embedding), 'camera': self.camera(embedding)}
    if self.aux_head is not None:
      out['aux_joints'] = self.aux_joints(embedding)
    return out


def plain_path(model: DiffHand) -> DiffHand:
  """`model` with `cpu_kernels` off in its encoder and decoder: the same parameters and
  function on the plain Flax/JAX path (library layers, autodiff, `jax.nn` attention)."""
  plain = lambda m: m.clone(cpu_kernels=False) if getattr(m, 'cpu_kernels', False) else m
  return model.clone(encoder=plain(model.encoder), decoder=plain(model.decoder))


def build_model(config) -> DiffHand:
  """Builds DiffHand from the experiment config (contract of docs/ARCHITECTURE.md).

  The template hand is `procedural_mano.load_hand_model(config)`: its vertices give the FPS
  levels and `mano.joint_regressor21(hand, config.tip_vertex_ids)` the 21-joint regressor, both
  computed here once. The encoder is `encoder.build_encoder(config.model, dtype)`.

  Args:
    config: the experiment ConfigDict.

  Returns:
    The (hashable, unbound) DiffHand module.
  """
  hand = procedural_mano.load_hand_model(config)
  regressor = mano.joint_regressor21(hand, tuple(config.tip_vertex_ids))
  encoder = encoder_lib.build_encoder(
      config.model, compute_dtype(config.model.dtype), int(config.data.image_size)
  )
  return assemble_model(config, encoder, hand.v_template, regressor, hand.faces)


def assemble_model(
    config,
    encoder: nn.Module,
    template: np.ndarray,
    joint_regressor: np.ndarray,
    faces: Optional[np.ndarray] = None,
) -> DiffHand:
  """DiffHand from explicit parts (what `build_model` uses; tests pass stand-ins).

  Reads config.model (width, num_heads, num_blocks, downsample_rate, num_levels, mlp_ratio,
  aux_head, dtype, remat, cpu_kernels), config.decoder, config.diffusion, config.vertex_scale, config.schedule
  and config.data.image_size.

  Args:
    config: the experiment ConfigDict.
    encoder: (images, depth=None) -> (tokens [B,P,D], embedding [B,D]) module.
    template: [N, 3] template vertices (for farthest point sampling).
    joint_regressor: [21, N] joints = R @ vertices.
    faces: optional [F, 3] triangles of the template (for smoothing in `sampling.sample`).

  Returns:
    The DiffHand module.
  """
  dtype = compute_dtype(config.model.dtype)
  if config.decoder not in ('cross_modality', 'vanilla'):
    raise ValueError(
        f"config.decoder must be 'cross_modality' or 'vanilla', " f'got {config.decoder!r}'
    )
  template = checks.check_array('template', template, ('num_vertices', 3), dtype=np.float64)
  joint_regressor = checks.check_array(
      'joint_regressor', joint_regressor, (21, template.shape[0]), dtype=np.float32
  )
  level_indices = decoder_lib.fps_level_indices(
      template, config.model.downsample_rate, config.model.num_levels
  )
  decoder = decoder_lib.Decoder(
      num_points=template.shape[0],
      width=config.model.width,
      num_heads=config.model.num_heads,
      num_blocks=config.model.num_blocks,
      mlp_ratio=config.model.mlp_ratio,
      level_indices=level_indices,
      kind=config.decoder,
      dtype=dtype,
      remat=bool(config.model.get('remat', False)),
      cpu_kernels=encoder_lib.cpu_kernels_enabled(config.model),
  )
  return DiffHand(
      encoder=encoder,
      decoder=decoder,
      joint_regressor=StaticArray(joint_regressor),
      vertex_scale=float(config.vertex_scale),
      diffusion=bool(config.diffusion),
      num_timesteps=int(config.schedule.num_timesteps),
      cosine_s=float(config.schedule.cosine_s),
      aux_head=(JointHead(joint_regressor.shape[0], dtype) if config.model.aux_head else None),
      dtype=dtype,
      image_size=int(config.data.image_size),
      faces=None if faces is None else StaticArray(np.asarray(faces, np.int32)),
  )


def init_params(
    model: DiffHand, rng: jax.Array, images: jax.Array, depth: Optional[jax.Array] = None
):
  """Initialises the parameters (float32) with a zero x_t and t = 0.

  Args:
    model: from `build_model`.
    rng: PRNG key.
    images: [B, H, W, 3] example images (only shapes matter; B = 1 is enough).
    depth: optional [B, H, W, 1] when the encoder has a depth branch.

  Returns:
    The 'params' collection: call `model.apply({'params': params}, ...)`.
  """
  check_images(images, depth)
  x_t = jnp.zeros((images.shape[0], model.num_points, 3), jnp.float32)
  t = jnp.zeros((images.shape[0],), jnp.int32)
  variables = jax.jit(model.init)(rng, images, x_t, t, depth)
  return variables['params']
