"""Argument checks at module boundaries: one helper, one wording.

`check_array` raises ValueError with messages of one form:
  "<name> must have shape [batch, 778, 3], got (2, 21, 3)"
  "<name> must be floating, got int32"
  "<name> contains NaN or infinite values"
It accepts numpy-convertible values and jax arrays, traced ones included (under jit only the
shape and dtype are checked: a tracer has no values yet).
"""

from typing import Any, Optional, Sequence, Union

import jax
import numpy as np

# One entry of a shape pattern: an exact size, a named size of any value (the name only
# appears in the message), or None (any size). A leading Ellipsis allows any leading axes.
Dim = Union[int, str, None]


def describe_shape(shape: Sequence[Any]) -> str:
  """The message form of a shape pattern: ('batch', 778, 3) -> '[batch, 778, 3]'.

  None is shown as '_' and Ellipsis as '...'.
  """

  def word(dim):
    return '_' if dim is None else '...' if dim is Ellipsis else str(dim)

  return '[' + ', '.join(word(dim) for dim in shape) + ']'


def _shape_matches(actual: tuple, pattern: tuple) -> bool:
  if pattern and pattern[0] is Ellipsis:
    pattern = pattern[1:]
    if len(actual) < len(pattern):
      return False
    actual = actual[len(actual) - len(pattern) :]
  elif len(actual) != len(pattern):
    return False
  return all(not isinstance(want, int) or want == got for got, want in zip(actual, pattern))


def check_array(
    name: str,
    x: Any,
    shape: Optional[Sequence[Dim]] = None,
    *,
    kind: Any = None,
    dtype: Any = None,
    finite: bool = True,
):
  """Returns `x` as an array after checking its shape, dtype kind and values.

  Args:
    name: what the caller calls `x` (starts every message).
    x: a jax array (kept as one, traced or not) or anything np.asarray accepts.
    shape: a pattern such as ('batch', 778, 3), (None, 3) or (Ellipsis, 3); None skips it.
    kind: a required numpy dtype or dtype family of the input (np.floating, np.integer,
      np.uint8, ...); None accepts any.
    dtype: the dtype to return (np.asarray / jnp.asarray conversion); None keeps the input's.
    finite: reject NaN and infinite values (skipped for traced arrays and integer dtypes).

  Returns:
    The checked array: numpy for numpy-convertible input, a jax array for jax input.

  Raises:
    ValueError: a wrong shape, dtype kind or a non-finite value.
  """
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
  if shape is not None and not _shape_matches(tuple(x.shape), tuple(shape)):
    raise ValueError(f'{name} must have shape {describe_shape(shape)}, got {tuple(x.shape)}')
  if kind is not None and not np.issubdtype(x.dtype, kind):
    raise ValueError(f'{name} must be {getattr(kind, "__name__", kind)}, got {x.dtype}')
  if dtype is not None:
    x = x.astype(dtype) if isinstance(x, jax.Array) else np.asarray(x, dtype)
  if finite and not isinstance(x, jax.core.Tracer) and np.issubdtype(x.dtype, np.inexact):
    if not np.all(np.isfinite(np.asarray(x))):
      raise ValueError(f'{name} contains NaN or infinite values')
  return x
