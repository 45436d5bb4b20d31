"""layers.py on both paths: the plain Flax/JAX path and the CPU rewrites (`cpu_kernels=True`).

References: float64 numpy closed forms for the CPU `linear` and its three gradients, and flax's
own nn.Dense / nn.MultiHeadDotProductAttention, whose parameters (names, shapes, initial values)
both paths must reproduce so that checkpoints load unchanged. The rewrites change the backward
pass, so they are compared on gradients, not only on outputs; forward-mode autodiff is checked
on the plain path against finite differences.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffhand_jax.models import cpu_kernels
from diffhand_jax.models import layers


def _normal(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape)


def test_cpu_linear_and_its_gradients_match_float64_closed_forms():
  x, kernel, bias = _normal(0, 2, 5, 3), _normal(1, 3, 4), _normal(2, 4)
  d_out = _normal(3, 2, 5, 4)
  args = (jnp.asarray(a, jnp.float32) for a in (x, kernel, bias))
  out, vjp = jax.vjp(cpu_kernels.linear, *args)
  d_x, d_kernel, d_bias = vjp(jnp.asarray(d_out, jnp.float32))
  np.testing.assert_allclose(out, np.einsum('bnk,kf->bnf', x, kernel) + bias, atol=1e-5)
  np.testing.assert_allclose(d_x, np.einsum('bnf,kf->bnk', d_out, kernel), atol=1e-5)
  np.testing.assert_allclose(d_kernel, np.einsum('bnk,bnf->kf', x, d_out), atol=1e-5)
  np.testing.assert_allclose(d_bias, d_out.sum(axis=(0, 1)), atol=1e-5)


def test_cpu_linear_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='linear: x'):
    cpu_kernels.linear(jnp.zeros((2, 3)), jnp.zeros((4, 5)), jnp.zeros(5))
  with pytest.raises(ValueError, match='linear: x'):
    cpu_kernels.linear(jnp.zeros((2, 4)), jnp.zeros((4, 5)), jnp.zeros(4))


def test_erf_gelu_is_flax_exact_gelu_and_not_tanh():
  x = jnp.linspace(-4.0, 4.0, 801)
  exact = nn.gelu(x, approximate=False)
  np.testing.assert_allclose(cpu_kernels.erf_gelu(x), exact, atol=2e-6)
  grad = lambda fn: jax.grad(lambda v: fn(v).sum())(x)
  np.testing.assert_allclose(grad(cpu_kernels.erf_gelu), grad(layers.gelu), atol=2e-6)
  assert np.abs(layers.gelu(x) - nn.gelu(x, approximate=True)).max() > 1e-4  # exact, not tanh


def _assert_trees_close(got, want, atol):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5)


def _perturbed(params):
  """Non-trivial parameters (non-zero biases) from the initial ones, deterministically."""
  return jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)


def _assert_same_function_and_gradients(modules, reference, inputs, atol):
  """Each module: the reference's initial parameters, outputs and gradients (params, inputs)."""
  key = jax.random.PRNGKey(0)
  params = reference.init(key, *inputs)
  loss = lambda module: lambda p, *xs: jnp.sum(jnp.sin(module.apply(p, *xs)))
  argnums = tuple(range(len(inputs) + 1))
  want_out = reference.apply(_perturbed(params), *inputs)
  want_grads = jax.grad(loss(reference), argnums)(_perturbed(params), *inputs)
  for module in modules:
    _assert_trees_close(module.init(key, *inputs), params, atol=0)  # same draws, same names
    np.testing.assert_allclose(module.apply(_perturbed(params), *inputs), want_out, atol=atol)
    got = jax.jit(jax.grad(loss(module), argnums))(_perturbed(params), *inputs)
    _assert_trees_close(got, want_grads, atol=atol)


@pytest.mark.parametrize('features,in_axes', [((5,), 1), ((3, 4), 1), ((6,), 2)])
def test_projection_is_flax_dense_general_on_both_paths(features, in_axes):
  x = jnp.asarray(_normal(4, 2, 7, 3, 2), jnp.float32)

  class Library(nn.Module):  # flax's layer as a child named like the ones below

    @nn.compact
    def __call__(self, x):
      axis = tuple(range(-in_axes, 0))
      return nn.DenseGeneral(features, axis=axis, kernel_init=layers.DENSE_INIT, name='dense')(x)

  class Projection(nn.Module):
    cpu: bool

    @nn.compact
    def __call__(self, x):
      return layers.projection(features, in_axes, jnp.float32, 'dense', self.cpu)(x)

  modules = [Projection(False), Projection(True)]
  _assert_same_function_and_gradients(modules, Library(), (x,), atol=1e-5)


def test_multi_head_attention_is_flax_module_on_both_paths():
  x = jnp.asarray(_normal(5, 2, 10, 32), jnp.float32)
  tokens = jnp.asarray(_normal(6, 2, 5, 24), jnp.float32)
  reference = nn.MultiHeadDotProductAttention(num_heads=4, kernel_init=layers.DENSE_INIT)
  modules = [layers.MultiHeadAttention(4), layers.MultiHeadAttention(4, cpu_kernels=True)]
  _assert_same_function_and_gradients(modules, reference, (x, tokens), atol=2e-5)
  with pytest.raises(ValueError, match='not divisible'):
    layers.MultiHeadAttention(num_heads=5).init(jax.random.PRNGKey(0), x, tokens)


@pytest.mark.parametrize('module', [layers.Mlp(24), layers.SelfAttention(4)])
def test_plain_and_cpu_blocks_have_the_same_gradients(module):
  x = jnp.asarray(_normal(8, 2, 6, 16), jnp.float32)
  cpu = module.clone(cpu_kernels=True)
  _assert_same_function_and_gradients([module, cpu], module, (x,), atol=2e-5)


def test_plain_path_supports_forward_mode_and_matches_finite_differences():
  x = jnp.asarray(_normal(9, 2, 6, 16), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  tokens = jnp.asarray(_normal(10, 2, 4, 16), x.dtype)
  direction = jnp.asarray(_normal(11, *x.shape), x.dtype)
  module = layers.MultiHeadAttention(4)
  params = _perturbed(module.init(jax.random.PRNGKey(0), x, tokens))
  fn = lambda v: module.apply(params, v, tokens)
  _, tangent = jax.jvp(fn, (x,), (direction,))
  eps = 1e-2
  finite = (fn(x + eps * direction) - fn(x - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(tangent, finite, atol=2e-3, rtol=2e-3)
  with pytest.raises(TypeError, match='forward-mode'):  # why the rewrites stay off by default
    jax.jvp(lambda v: module.clone(cpu_kernels=True).apply(params, v, tokens), (x,), (direction,))


@pytest.mark.parametrize('cpu', [False, True])
def test_bfloat16_compute_float32_parameters_and_gradients(cpu):
  x = jnp.asarray(_normal(7, 3, 8), jnp.float32)

  class Dense(nn.Module):
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
      return layers.dense(4, self.dtype, 'dense', cpu)(x)

  module, reference = Dense(jnp.bfloat16), Dense(jnp.float32)
  params = module.init(jax.random.PRNGKey(2), x)
  out = module.apply(params, x)
  assert out.dtype == jnp.bfloat16
  want = reference.apply(params, x)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2)
  grads = jax.grad(lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32) ** 2))(params)
  want_grads = jax.grad(lambda p: jnp.sum(reference.apply(p, x) ** 2))(params)
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, atol=5e-2, rtol=5e-2)
