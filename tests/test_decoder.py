"""Tests of diffhand_jax/models/decoder.py: FPS, embeddings, blocks against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from diffhand_jax.models import decoder as decoder_lib

# ---- Farthest point sampling ----


def _naive_fps(points, num_samples):
  """O(N^2) per pick: recompute every point's distance to the nearest picked point."""
  picked = [0]
  while len(picked) < num_samples:
    best, best_dist = None, -1.0
    for i in range(len(points)):
      nearest = min(sum((points[i][d] - points[j][d]) ** 2 for d in range(3)) for j in picked)
      if nearest > best_dist:
        best, best_dist = i, nearest
    picked.append(best)
  return picked


def test_fps_matches_naive_implementation():
  points = np.random.default_rng(0).normal(size=(60, 3))
  for num in (1, 2, 15, 60):
    np.testing.assert_array_equal(
        decoder_lib.farthest_point_sampling(points, num), _naive_fps(points.tolist(), num)
    )


def test_fps_level_indices_nested_distinct_and_fps():
  template = np.random.default_rng(1).normal(size=(778, 3))
  levels = decoder_lib.fps_level_indices(template, 4, 2)
  assert [len(level) for level in levels] == [194, 48]
  assert decoder_lib.level_sizes(778, 4, 2) == (778, 194, 48)
  hash(levels)  # static, hashable
  previous_size, points = 778, template
  absolute = np.arange(778)
  for level in levels:
    level = np.asarray(level)
    assert len(set(level.tolist())) == len(level)  # distinct
    assert level.min() >= 0 and level.max() < previous_size  # a subset of the previous level
    np.testing.assert_array_equal(
        level,
        _naive_fps(points.tolist(), len(level))
        if len(level) < 60
        else decoder_lib.farthest_point_sampling(points, len(level)),
    )
    points, previous_size, absolute = points[level], len(level), absolute[level]
  # FPS orders are prefix codes, so level 2 is also the first 48 FPS picks of all vertices.
  np.testing.assert_array_equal(absolute, decoder_lib.farthest_point_sampling(template, 194)[:48])


def test_fps_rejects_bad_input():
  with pytest.raises(ValueError, match='NaN'):
    decoder_lib.farthest_point_sampling(np.full((5, 3), np.nan), 2)
  with pytest.raises(ValueError, match='num_samples'):
    decoder_lib.farthest_point_sampling(np.zeros((5, 3)), 6)
  with pytest.raises(ValueError, match='downsample'):
    decoder_lib.fps_level_indices(np.zeros((10, 3)), 4, 2)


# ---- Embeddings ----


def test_timestep_embedding_formula():
  t = np.array([0, 7, 999])
  out = np.asarray(decoder_lib.timestep_embedding(jnp.asarray(t), 8))
  freqs = np.array([10000.0 ** (-i / 4) for i in range(4)])
  expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], -1)
  np.testing.assert_allclose(out, expected, atol=2e-4)
  with pytest.raises(ValueError, match='even'):
    decoder_lib.timestep_embedding(jnp.asarray(t), 7)


# ---- Numpy references of the blocks (written from the equations, not from the module) ----


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _mlp(x, p):
  hidden = x @ p['fc1']['kernel'] + p['fc1']['bias']
  hidden = 0.5 * hidden * (1 + special.erf(hidden / np.sqrt(2)))
  return hidden @ p['fc2']['kernel'] + p['fc2']['bias']


def _attention(queries, keys, p):
  """Multi-head attention; kernels [C, heads, head_dim], out [heads, head_dim, C]."""
  q = np.einsum('bnc,chd->bnhd', queries, p['query']['kernel']) + p['query']['bias']
  k = np.einsum('bmc,chd->bmhd', keys, p['key']['kernel']) + p['key']['bias']
  v = np.einsum('bmc,chd->bmhd', keys, p['value']['kernel']) + p['value']['bias']
  logits = np.einsum('bnhd,bmhd->bhnm', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('bhnm,bmhd->bnhd', weights, v)
  return np.einsum('bnhd,hdc->bnc', out, p['out']['kernel']) + p['out']['bias']


def _attention_block(h, g, tokens, p):
  x = _layer_norm(h, p['norm_self'])
  h = h + _attention(x, x, p['self_attention'])
  h = h + g[:, None]
  x = _layer_norm(h, p['norm_cross'])
  h = h + _attention(x, tokens, p['cross_attention'])
  return h + _mlp(_layer_norm(h, p['norm_mlp']), p['mlp'])


def _init_apply(module, *inputs):
  """Jitted init and apply (op-by-op dispatch of a whole decoder is slow on CPU)."""
  params = jax.jit(module.init)(jax.random.key(0), *inputs)['params']
  return params, jax.jit(lambda p, *a: module.apply({'params': p}, *a))


def _random_params_and_apply(module, *inputs, seed=1):
  """N(0, 0.3^2) for every leaf (biases and norms non-trivial too) and a jitted apply.

  Only the parameter shapes are needed, so `init` is evaluated abstractly, not compiled.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)['params']
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [0.3 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]
  )
  return params, jax.jit(lambda p, *a: module.apply({'params': p}, *a))


def _to_numpy(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _inputs(batch=2, points=40, tokens=5, width=16, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (
      jax.random.normal(keys[0], (batch, points, width)),
      jax.random.normal(keys[1], (batch, width)),
      jax.random.normal(keys[2], (batch, tokens, width)),
  )


def test_attention_block_matches_numpy_reference():
  h, g, tokens = _inputs()
  params, apply = _random_params_and_apply(
      decoder_lib.AttentionBlock(num_heads=2, mlp_ratio=2), h, g, tokens
  )
  out = apply(params, h, g, tokens)
  expected = _attention_block(*map(np.asarray, (h, g, tokens)), _to_numpy(params))
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_vertex_block_u_shape_matches_numpy_reference():
  h, g, tokens = _inputs(points=40)
  levels = decoder_lib.fps_level_indices(np.random.default_rng(0).normal(size=(40, 3)), 2, 2)
  params, apply = _random_params_and_apply(
      decoder_lib.VertexBlock(levels, num_heads=2, mlp_ratio=2), h, g, tokens
  )
  out = apply(params, h, g, tokens)

  p = _to_numpy(params)
  h, g, tokens = map(np.asarray, (h, g, tokens))
  level0 = h
  level1 = _attention_block(level0[:, list(levels[0])], g, tokens, p['down_attention_1'])
  level2 = _attention_block(level1[:, list(levels[1])], g, tokens, p['down_attention_2'])

  def upsample(x, q):  # a linear map over points: out[b, m] = sum_n x[b, n] W[n, m] + c[m]
    return np.einsum('bnc,nm->bmc', x, q['point_map']['kernel']) + q['point_map']['bias'][:, None]

  up1 = upsample(level2, p['upsample_2']) + level1
  expected = upsample(up1, p['upsample_1']) + level0
  assert out.shape == (2, 40, 16)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_feature_block_matches_numpy_reference():
  h, _, _ = _inputs()
  params, apply = _random_params_and_apply(decoder_lib.FeatureBlock(mlp_ratio=3), h)
  out = apply(params, h)
  p = _to_numpy(params)
  expected = np.asarray(h) + _mlp(_layer_norm(np.asarray(h), p['norm']), p['mlp'])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


# ---- The decoder ----


def _decoder(kind, dtype=jnp.float32, num_blocks=2, remat=False):
  template = np.random.default_rng(0).normal(size=(778, 3))
  return decoder_lib.Decoder(
      num_points=778,
      width=16,
      num_heads=2,
      num_blocks=num_blocks,
      mlp_ratio=2,
      level_indices=decoder_lib.fps_level_indices(template, 4, 2),
      kind=kind,
      dtype=dtype,
      remat=remat,
  )


def _decoder_inputs(batch=2):
  keys = jax.random.split(jax.random.key(0), 3)
  return (
      jax.random.normal(keys[0], (batch, 778, 3)),
      jnp.array([0, 999][:batch]),
      jax.random.normal(keys[1], (batch, 6, 24)),
      jax.random.normal(keys[2], (batch, 24)),
  )


@pytest.mark.parametrize('kind', ['cross_modality', 'vanilla'])
def test_decoder_shapes_layer_counts_and_inputs(kind):
  x_t, t, tokens, embedding = _decoder_inputs()
  params, apply = _init_apply(_decoder(kind), x_t, t, tokens, embedding)
  run = lambda *a: np.asarray(apply(params, *a))
  out = run(x_t, t, tokens, embedding)
  assert out.shape == (2, 778, 3) and out.dtype == np.float32
  assert np.all(np.isfinite(out))
  # The output depends on every input, and examples are independent of each other.
  assert not np.allclose(out, run(x_t + 0.5, t, tokens, embedding))
  assert not np.allclose(out, run(x_t, t + 100, tokens, embedding))
  assert not np.allclose(out, run(x_t, t, tokens + 1.0, embedding))
  assert not np.allclose(out, run(x_t, t, tokens, embedding + 1.0))
  swapped = run(x_t[::-1], t[::-1], tokens[::-1], embedding[::-1])
  np.testing.assert_allclose(swapped[::-1], out, rtol=1e-5, atol=1e-5)
  if kind == 'cross_modality':
    assert sorted(k for k in params if 'block' in k) == [
        'feature_block_0',
        'feature_block_1',
        'vertex_block_0',
        'vertex_block_1',
    ]
    assert sorted(params['vertex_block_0']) == [
        'down_attention_1',
        'down_attention_2',
        'upsample_1',
        'upsample_2',
    ]
    assert params['vertex_block_0']['upsample_1']['point_map']['kernel'].shape == (194, 778)
    assert params['vertex_block_0']['upsample_2']['point_map']['kernel'].shape == (48, 194)
  else:
    # As many attention blocks as the cross-modality decoder: num_blocks * num_levels.
    assert sorted(k for k in params if k.startswith('layer_')) == [
        'layer_0_0',
        'layer_0_1',
        'layer_1_0',
        'layer_1_1',
    ]


@pytest.mark.parametrize('kind', ['cross_modality', 'vanilla'])
def test_decoder_remat_same_parameters_outputs_and_gradients(kind):
  x_t, t, tokens, embedding = _decoder_inputs()
  plain, remat = _decoder(kind), _decoder(kind, remat=True)
  params = plain.init(jax.random.key(3), x_t, t, tokens, embedding)['params']
  remat_params = remat.init(jax.random.key(3), x_t, t, tokens, embedding)['params']
  # Same parameter tree (names, shapes, initial values): checkpoints load either way.
  jax.tree.map(np.testing.assert_array_equal, params, remat_params)

  def loss(module):
    return lambda p: jnp.mean(module.apply({'params': p}, x_t, t, tokens, embedding) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss(plain)))(params)
  remat_value, remat_grads = jax.jit(jax.value_and_grad(loss(remat)))(params)
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), remat_grads, grads
  )
  # The backward pass really recomputes: the remat jaxpr holds checkpoint (remat) primitives.
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(remat)))(params))
  assert 'checkpoint' in jaxpr or 'remat' in jaxpr
  assert not ('checkpoint' in str(jax.make_jaxpr(jax.grad(loss(plain)))(params)))


def test_decoder_bfloat16_keeps_float32_params_and_output():
  inputs = _decoder_inputs()
  params, apply16 = _init_apply(_decoder('cross_modality', jnp.bfloat16, num_blocks=1), *inputs)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
  decoder32 = _decoder('cross_modality', num_blocks=1)
  out16 = apply16(params, *inputs)
  out32 = jax.jit(decoder32.apply)({'params': params}, *inputs)
  assert out16.dtype == jnp.float32
  # Same function, lower precision: close, not equal.
  scale = np.abs(np.asarray(out32)).max()
  assert 0 < np.abs(np.asarray(out16) - np.asarray(out32)).max() < 0.1 * scale


def test_decoder_rejects_bad_shapes():
  decoder = _decoder('cross_modality', num_blocks=1)
  x_t, t, tokens, embedding = _decoder_inputs()
  with pytest.raises(ValueError, match='x_t'):
    decoder.init(jax.random.key(0), x_t[:, :10], t, tokens, embedding)
  with pytest.raises(ValueError, match='t must have shape'):
    decoder.init(jax.random.key(0), x_t, t[:1], tokens, embedding)
  with pytest.raises(ValueError, match='embedding'):
    decoder.init(jax.random.key(0), x_t, t, tokens, embedding[:, :5])
  with pytest.raises(ValueError, match='kind'):
    decoder_lib.Decoder(778, 16, 2, 1, 2, ((0,),), kind='unet').init(
        jax.random.key(0), x_t, t, tokens, embedding
    )
