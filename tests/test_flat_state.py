"""flat_state.py and optim.make_flat_optimizer: the flat step layout is the tree one, exactly
where it should be (conversion, resume) and to rounding where it cannot be (the clip's norm)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffhand_jax import flat_state
from diffhand_jax import logging_utils
from diffhand_jax import optim
from diffhand_jax import train
from diffhand_jax import train_step as train_step_lib
import helpers


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'dense': {'kernel': jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)},
      'bias': jnp.asarray(rng.normal(size=(4,)), jnp.float32),
      'table': jnp.asarray(rng.normal(size=(3, 2, 2)), jnp.float32),
  }


def _config(clip=0.05, decay=0.1):
  config = helpers.tiny_config()
  config.optim.grad_clip_norm = clip
  config.optim.weight_decay = decay
  return config


def _layout(config, params, num_steps=10):
  tree_opt = optim.make_optimizer(config.optim, num_steps)
  flat_opt = optim.make_flat_optimizer(config.optim, num_steps, params)
  return tree_opt, flat_opt, flat_state.FlatLayout(params, tree_opt.init(params), flat_opt)


def _grads(step, params):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def test_flat_optimizer_matches_the_tree_optimizer():
  config = _config()
  params = _params()
  tree_opt, flat_opt, layout = _layout(config, params)
  tree_state, flat_params = tree_opt.init(params), layout.ravel(params)
  flat_state_ = flat_opt.init(flat_params)
  tree_params = params
  for step in range(3):
    grads = _grads(step, params)
    assert float(optax.global_norm(grads)) > 10 * config.optim.grad_clip_norm  # clips
    updates, tree_state = tree_opt.update(grads, tree_state, tree_params)
    tree_params = optax.apply_updates(tree_params, updates)
    flat_updates, flat_state_ = flat_opt.update(layout.ravel(grads), flat_state_, flat_params)
    flat_params = flat_params + flat_updates
  got = layout.unravel(flat_params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree_params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The moments, converted back, are the tree optimiser's.
  as_tree = layout.to_tree(
      train_step_lib.TrainState(
          step=jnp.int32(3), params=flat_params, opt_state=flat_state_, ema_params=None, rng=None
      )
  )
  for a, b in zip(jax.tree.leaves(as_tree.opt_state), jax.tree.leaves(tree_state)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  # Weight decay is masked as in the tree: with zero gradients only the >= 2-D leaves move,
  # by -lr * wd * p (lr 1 from the first step: no warm-up).
  config = _config(clip=0.0, decay=0.5)
  config.optim.learning_rate, config.optim.warmup_steps = 1.0, 0
  flat_opt = optim.make_flat_optimizer(config.optim, 10, params)
  flat_params = layout.ravel(params)
  zeros = jnp.zeros_like(flat_params)
  updates, _ = flat_opt.update(zeros, flat_opt.init(flat_params), flat_params)
  updates = layout.unravel(updates)
  np.testing.assert_array_equal(updates['bias'], np.zeros(4))
  np.testing.assert_allclose(updates['dense']['kernel'], -0.5 * params['dense']['kernel'])
  np.testing.assert_allclose(updates['table'], -0.5 * params['table'])


def test_to_flat_and_back_is_exact():
  config = _config()
  params = _params(1)
  tree_opt, _, layout = _layout(config, params)
  state = train_step_lib.create_train_state(params, tree_opt, jax.random.PRNGKey(0), 0.5)
  for step in range(2):  # non-zero moments and counts
    updates, opt_state = tree_opt.update(_grads(step, params), state.opt_state, state.params)
    state = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
  flat = layout.to_flat(state)
  assert flat.params.shape == (layout.size,) and flat.ema_params.shape == (layout.size,)
  assert layout.size == 5 * 4 + 4 + 3 * 2 * 2
  vectors = [x for x in jax.tree.leaves(flat.opt_state) if jnp.shape(x) == (layout.size,)]
  assert len(vectors) == 2  # AdamW's mu and nu
  back = layout.to_tree(flat)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_mismatched_layouts_raise():
  config = _config()
  params = _params()
  tree_opt = optim.make_optimizer(config.optim, 10)
  other = optax.sgd(0.1, momentum=0.9)  # one vector, no counts
  with pytest.raises(ValueError, match='optimiser states do not match'):
    flat_state.FlatLayout(params, tree_opt.init(params), other)
  # An optimiser whose state is not parameter-sized where AdamW's moments are.
  short = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.GradientTransformation(
          lambda p: optax.ScaleByAdamState(jnp.zeros([], jnp.int32), p[:7], p[:7]), None
      ),
      optax.scale_by_learning_rate(lambda count: 0.1),  # a schedule: one count, as AdamW
  )
  with pytest.raises(ValueError, match=r'shape \(7,\) in the flat layout, expected \(36,\)'):
    flat_state.FlatLayout(params, tree_opt.init(params), short)
  mixed = dict(params, half=jnp.zeros((2,), jnp.bfloat16))
  with pytest.raises(ValueError, match='one parameter dtype'):
    flat_state.FlatLayout(mixed, None, None)


@pytest.mark.parametrize('parallelism', ['jit', 'pmap'])
def test_training_with_and_without_the_flat_layout_agrees(tmp_path, parallelism):
  runs = {}
  for flat in (False, True):
    config = helpers.tiny_config(parallelism=parallelism, flat_state=flat)
    workdir = str(tmp_path / str(flat))
    state = train.run_training(config, workdir, helpers.tiny_task(config))
    losses = [r['loss'] for r in logging_utils.read_scalars(workdir, 'train')]
    runs[flat] = (losses, jax.device_get(state))
  (tree_losses, tree_state), (flat_losses, flat_state_) = runs[False], runs[True]
  assert len(tree_losses) == 4
  np.testing.assert_allclose(flat_losses, tree_losses, rtol=1e-5)
  # The returned state is in the tree layout either way.
  assert jax.tree.structure(flat_state_) == jax.tree.structure(tree_state)
  for name in ('params', 'ema_params', 'opt_state'):
    assert helpers.max_rel_diff(getattr(flat_state_, name), getattr(tree_state, name)) < 1e-5, name
  initial = helpers.tiny_init(jax.random.split(jax.random.PRNGKey(config.seed))[0])  # as trained
  assert helpers.max_rel_diff(tree_state.params, initial) > 1e-3  # the runs did move
