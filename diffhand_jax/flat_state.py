"""The training state as flat vectors inside the compiled step (`config.train.flat_state`).

Done leaf by leaf, the gradient clip, AdamW, its decay mask, the update and the norms are
~2,300 of the synthetic train step's ~3,900 top-level fusions (276 parameter arrays), and XLA's
CPU executable load grows with them. With the parameters, the optimiser's moments and the EMA
each one vector, that part is a handful of fusions: executable load 0.24x (a warm start's
largest cost), the same compile and step time (BENCHMARKS.md, `benchmarks/state_layout.py`).

Only the compiled step sees the flat layout. Checkpoints, `init_from`, evaluation and export
keep the parameter tree: `FlatLayout.to_flat` / `to_tree` convert exactly (concatenation and
slicing in `jax.tree.leaves` order), so resuming stays bit-exact.
"""

from typing import Any, Callable, List, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffhand_jax import optim
from diffhand_jax import train_step as train_step_lib


def _shape(x) -> tuple:
  """Shape of an array, a jax.ShapeDtypeStruct or a Python scalar."""
  return tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)


class FlatLayout:
  """Converts a TrainState between the parameter-tree layout and the flat one.

  The optimiser states of the two layouts are matched item by item: in the tree layout an
  item is a subtree with the parameters' structure (AdamW's mu, nu) or any other leaf (step
  counts); in the flat layout the same item is a vector of all parameters, or the same leaf.
  Containers without leaves (optax's EmptyState, MaskedState) may differ.

  Args:
    params: the parameter tree, or its `jax.ShapeDtypeStruct`s: only the structure, shapes and
      dtype are read (one dtype for all leaves), so a layout needs no weights allocated.
    tree_opt_state: the tree optimiser's state for `params` (a template).
    flat_optimizer: the optimiser of the raveled `params` (`optim.make_flat_optimizer`); its
      state's shapes are taken with `jax.eval_shape`.
  """

  def __init__(self, params, tree_opt_state, flat_optimizer):
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(params)}
    if len(dtypes) != 1:
      raise ValueError(
          f'a flat training state needs one parameter dtype, got {sorted(map(str, dtypes))}; '
          'set config.train.flat_state = False'
      )
    self._treedef = jax.tree.structure(params)
    self._shapes = [_shape(leaf) for leaf in jax.tree.leaves(params)]
    self._offsets = np.cumsum([0] + [int(np.prod(shape)) for shape in self._shapes])
    self.size = int(self._offsets[-1])
    flat = jax.ShapeDtypeStruct((self.size,), dtypes.pop())
    flat_opt_state = jax.eval_shape(flat_optimizer.init, flat)
    self._tree_opt = jax.tree.structure(tree_opt_state, is_leaf=self._is_params)
    self._flat_opt = jax.tree.structure(flat_opt_state)
    tree_items = jax.tree.leaves(tree_opt_state, is_leaf=self._is_params)
    flat_items = jax.tree.leaves(flat_opt_state)
    if len(tree_items) != len(flat_items):
      raise ValueError(
          f'the optimiser states do not match: {len(tree_items)} items in the tree layout, '
          f'{len(flat_items)} in the flat one'
      )
    self._is_vector: List[bool] = []
    for index, (tree_item, flat_item) in enumerate(zip(tree_items, flat_items)):
      is_vector = self._is_params(tree_item)
      expected = (self.size,) if is_vector else _shape(tree_item)
      if _shape(flat_item) != expected:
        raise ValueError(
            f'optimiser state item {index}: shape {_shape(flat_item)} in the flat layout, '
            f'expected {expected}'
        )
      self._is_vector.append(is_vector)

  def _is_params(self, node) -> bool:
    return jax.tree.structure(node) == self._treedef

  def ravel(self, tree) -> jax.Array:
    """A parameter-shaped tree -> [size] vector (leaves in `jax.tree.leaves` order)."""
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])

  def unravel(self, vector: jax.Array):
    """[size] vector -> the parameter tree."""
    # One split (its transpose, in the gradient, is one concatenation); a slice per leaf would
    # transpose to a parameter-sized pad per leaf (2.6 GB of temporaries for the synthetic step).
    pieces = jnp.split(vector, [int(offset) for offset in self._offsets[1:-1]])
    return jax.tree.unflatten(
        self._treedef, [piece.reshape(shape) for piece, shape in zip(pieces, self._shapes)]
    )

  def wrap_loss(self, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """loss_fn(params_tree, batch, keys) as a function of the flat parameter vector."""
    return lambda flat, batch, keys: loss_fn(self.unravel(flat), batch, keys)

  def to_flat(self, state: train_step_lib.TrainState) -> train_step_lib.TrainState:
    items = jax.tree.leaves(state.opt_state, is_leaf=self._is_params)
    items = [self.ravel(x) if v else x for x, v in zip(items, self._is_vector)]
    return state.replace(
        params=self.ravel(state.params),
        opt_state=jax.tree.unflatten(self._flat_opt, items),
        ema_params=None if state.ema_params is None else self.ravel(state.ema_params),
    )

  def to_tree(self, state: train_step_lib.TrainState) -> train_step_lib.TrainState:
    items = jax.tree.leaves(state.opt_state)
    items = [self.unravel(x) if v else x for x, v in zip(items, self._is_vector)]
    return state.replace(
        params=self.unravel(state.params),
        opt_state=jax.tree.unflatten(self._tree_opt, items),
        ema_params=None if state.ema_params is None else self.unravel(state.ema_params),
    )

  def eval_params(self, state: train_step_lib.TrainState):
    """`train_step.eval_params` of a flat state, as a tree (the moments stay flat)."""
    return self.unravel(train_step_lib.eval_params(state))


class StepLayout(NamedTuple):
  """What the compiled step is built from, and the state conversions around it."""

  loss_fn: Callable[..., Any]
  optimizer: Any  # optax.GradientTransformation
  to_step: Callable[[train_step_lib.TrainState], train_step_lib.TrainState]
  from_step: Callable[[train_step_lib.TrainState], train_step_lib.TrainState]
  eval_params: Callable[[train_step_lib.TrainState], Any]  # the step's state -> params tree


def step_layout(config, num_steps: int, loss_fn, optimizer, state) -> StepLayout:
  """The step's loss, optimiser and conversions for `config.train.flat_state`.

  Args:
    config: the run's config (train.flat_state, default True; optim).
    num_steps: the schedule's length.
    loss_fn: (params_tree, batch, keys) -> (loss, aux).
    optimizer: `optim.make_optimizer(config.optim, num_steps)` (the tree layout's).
    state: a TrainState in the tree layout (its params and optimiser state are the templates).
  """
  if not config.train.get('flat_state', True):
    identity = lambda state: state
    return StepLayout(loss_fn, optimizer, identity, identity, train_step_lib.eval_params)
  flat_optimizer = optim.make_flat_optimizer(config.optim, num_steps, state.params)
  layout = FlatLayout(state.params, state.opt_state, flat_optimizer)
  return StepLayout(
      layout.wrap_loss(loss_fn),
      flat_optimizer,
      layout.to_flat,
      layout.to_tree,
      layout.eval_params,
  )
