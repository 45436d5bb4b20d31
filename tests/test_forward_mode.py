"""Forward-mode autodiff (`jax.jvp`) through `sampling.sample` matches finite differences.

The paper-recipe configs run the plain Flax/JAX path (`config.model.cpu_kernels=False`), and the
sampling API runs it whatever the model was built with, so a caller can push tangents through
the whole sampler: encoder, camera head and the DDIM scan over the decoder.
"""

import jax
import jax.numpy as jnp
import numpy as np

from configs import freihand
from configs import synthetic
from diffhand_jax import sampling
from diffhand_jax.models import build_model
from diffhand_jax.models import init_params

IMAGE_SIZE = 32


def _paper_config():
  """The FreiHAND recipe with a DeiT encoder small enough for a test."""
  config = freihand.get_config('smoke')
  config.model.encoder, config.model.encoder_size = 'deit', 'micro'
  config.model.pretrained_path = ''
  config.data.image_size = IMAGE_SIZE
  return config


def _cpu_config():
  config = synthetic.get_config('smoke')
  config.data.image_size = IMAGE_SIZE
  assert config.model.cpu_kernels  # the CPU config trains with the rewrites
  return config


def _relative_error(got, want):
  return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def _sampler(config):
  """(vertices(images), images, direction): `sampling.sample` jitted on random parameters."""
  model = build_model(config)
  images = jax.random.normal(jax.random.key(0), (2, IMAGE_SIZE, IMAGE_SIZE, 3))
  params = init_params(model, jax.random.key(1), images)
  params = jax.tree.map(lambda p: p + 0.02 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)

  @jax.jit
  def vertices(images):
    out = sampling.sample(
        model, params, images, jax.random.key(3), num_sampling_steps=2, num_hypotheses=2
    )
    return out['vertices']

  return vertices, images, jax.random.normal(jax.random.key(2), images.shape)


def _assert_adjoint(fn, x, direction, tangent):
  """Forward and reverse mode agree: <u, J v> = <J^T u, v> for a random u."""
  cotangent = jax.random.normal(jax.random.key(4), tangent.shape)
  (pulled,) = jax.vjp(fn, x)[1](cotangent)
  np.testing.assert_allclose(jnp.vdot(cotangent, tangent), jnp.vdot(pulled, direction), rtol=1e-4)


def test_jvp_through_sample_with_the_paper_config_matches_finite_differences():
  config = _paper_config()
  assert not config.model.cpu_kernels
  vertices, images, direction = _sampler(config)
  value, tangent = jax.jvp(vertices, (images,), (direction,))
  eps = 1e-2
  finite = (vertices(images + eps * direction) - vertices(images - eps * direction)) / (2 * eps)
  assert float(jnp.linalg.norm(tangent)) > 1e-6  # the samples do depend on the image
  assert _relative_error(tangent, finite) < 2e-2
  np.testing.assert_allclose(value, vertices(images), atol=1e-6)
  _assert_adjoint(vertices, images, direction, tangent)


def test_sample_runs_the_plain_path_for_a_model_built_with_cpu_kernels():
  vertices, images, direction = _sampler(_cpu_config())  # custom VJPs in training
  _, tangent = jax.jvp(vertices, (images,), (direction,))
  assert float(jnp.linalg.norm(tangent)) > 1e-6
  _assert_adjoint(vertices, images, direction, tangent)


def test_sample_smooths_its_meshes_when_asked():
  from diffhand_jax import metrics, procedural_mano  # pylint: disable=g-import-not-at-top

  config = _cpu_config()
  model = build_model(config)
  images = jax.random.normal(jax.random.key(0), (2, IMAGE_SIZE, IMAGE_SIZE, 3))
  params = init_params(model, jax.random.key(1), images)
  faces = np.asarray(procedural_mano.load_hand_model(config).faces)
  run = lambda n: sampling.sample(
      model, params, images, jax.random.key(3), num_sampling_steps=1, smoothing_iterations=n
  )
  raw, smooth = run(0), run(1)
  assert np.all(
      metrics.roughness(smooth['vertices'], faces) < metrics.roughness(raw['vertices'], faces)
  )
  np.testing.assert_allclose(smooth['joints'][:, 0], 0.0, atol=1e-6)  # still root-relative
  with np.testing.assert_raises_regex(ValueError, 'faces'):
    sampling.sample(
        model.clone(faces=None), params, images, jax.random.key(3), smoothing_iterations=1
    )
