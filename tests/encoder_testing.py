"""Helpers shared by the encoder tests (no tests here: pytest does not collect this file).

Random inputs and parameters are drawn with numpy: every distinct eager jax.random call would
compile its own small XLA program, which dominated these tests' run time.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from configs import synthetic
from diffhand_jax.models import encoder


def model_config(
    encoder_name='vit',
    size='micro',
    distilled=False,
    use_depth=False,
    depth_zero_init='all',
    pretrained_image_size=64,
):
  """`config.model` of the smoke config with the encoder fields replaced."""
  config = synthetic.get_config('smoke').model
  config.encoder, config.encoder_size, config.distilled = encoder_name, size, distilled
  config.use_depth, config.depth_zero_init = use_depth, depth_zero_init
  config.pretrained_image_size = pretrained_image_size
  return config


def random_array(seed, shape, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_variables(module, *inputs, seed=0):
  """Random variables of the module's shapes without running (or compiling) its init.

  Every parameter is random (kernels He-scaled so activations stay O(1), norm scales near
  one, everything else N(0, 0.1^2)), so that no zero bias or unit scale hides a mistake.
  """
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      value = rng.normal(size=leaf.shape) * math.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    elif name == 'scale':
      value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    else:
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def perturbed(tree, seed, scale=0.1):
  """`tree` plus N(0, scale^2) noise on every leaf."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: a + jnp.asarray(scale * rng.normal(size=a.shape), a.dtype), tree)


def abstract_encoder_outputs(config, image_size, batch=2):
  """Shapes only (jax.eval_shape traces without compiling) of an encoder's variables and outputs.

  Returns:
    (variables, tokens, embedding) as ShapeDtypeStructs.
  """
  module = encoder.build_encoder(config)
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
  tokens, embedding = jax.eval_shape(module.apply, variables, images)
  return variables, tokens, embedding


def np_conv(x, kernel, stride):
  """Zero-padded ('same' for odd kernels) strided convolution by a loop over kernel taps."""
  k = kernel.shape[0]
  pad = k // 2
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
  for dy in range(k):
    for dx in range(k):
      window = x[:, dy : dy + stride * out_h : stride, dx : dx + stride * out_w : stride]
      out += window @ kernel[dy, dx]
  return out
