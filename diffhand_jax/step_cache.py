"""A disk cache of lowered train steps (`jax.export`): a warm start skips tracing and lowering.

A CPU tool, off by default (`config.train.step_cache`; `make demo` turns it on). JAX's
persistent compilation cache (launch.py's `--compilation_cache`) lets a second run of the same
program skip XLA's compile, but not the Python tracing and lowering that come first: for the
synthetic train step they take 3-5 s of a 6-10 s warm start on a 2-core CPU (BENCHMARKS.md).
`CachedStep` stores the lowered step (StableHLO, via `jax.export`) next to that cache, under a
key over everything the lowering depends on: the caller's key (the config and the hand-model
file, `config_key`), the package's source files, the library versions, every `jax.config` flag,
XLA_FLAGS, the platform and devices, the process count, and the structure, shapes, dtypes and
shardings of the arguments. A later process with the same key loads it and lowers only a call
to it (~0.2 s); its XLA executable then comes from the compilation cache.

Several processes (hosts on a shared file system) may use one folder: only process 0 writes,
under a temporary name unique to its host, process and call, renamed into place atomically, so
a reader sees the whole file or none. A missing file is traced; a file that cannot be read or
loaded is reported with a warning and traced; nothing is trusted without the full key matching
its name. To debug inside the Python loss (breakpoints, `jax_debug_nans`), leave the cache off:
with it a warm start never runs the Python step.
"""

import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import socket
import uuid
from typing import Any, Callable, List, Optional

from absl import logging
import jax

FORMAT = 1  # bump when the file layout below changes
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy')


@functools.cache
def source_digest() -> str:
  """sha256 over every .py file of the diffhand_jax package (paths and contents)."""
  digest = hashlib.sha256()
  for path in sorted(PACKAGE_DIR.rglob('*.py')):
    digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
    digest.update(path.read_bytes())
  return digest.hexdigest()


def _versions() -> dict:
  found = {}
  for name in LIBRARIES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def file_digest(path: str) -> str:
  """sha256 of a file's bytes ('' for an empty path)."""
  if not path:
    return ''
  digest = hashlib.sha256()
  with open(os.path.expanduser(path), 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def config_key(config) -> str:
  """The caller's part of the key for a train step built from `config`.

  The whole config (sorted JSON) and the bytes of the MANO file it names: the step closes
  over the hand model's arrays, so a changed file at the same path must not hit.
  """
  return json.dumps(
      dict(
          config=json.loads(config.to_json_best_effort(sort_keys=True)),
          mano=file_digest(config.mano_path),
      ),
      sort_keys=True,
  )


def default_cache_dir() -> Optional[str]:
  """<jax_compilation_cache_dir>/exported, or None when that cache is off."""
  base = jax.config.jax_compilation_cache_dir
  return os.path.join(base, 'exported') if base else None


def lowering_flags() -> dict:
  """Every `jax.config` flag (as text) and the XLA / libtpu flag variables: what else can
  change the lowered program for the same arguments."""
  flags = {name: str(value) for name, value in sorted(jax.config.values.items())}
  for variable in ('XLA_FLAGS', 'LIBTPU_INIT_ARGS'):
    flags[variable] = os.environ.get(variable, '')
  return flags


def _describe(tree) -> List[str]:
  """One line per leaf: shape, dtype and sharding (what the lowered program depends on)."""
  return [f'{x.shape} {x.dtype} {getattr(x, "sharding", None)}' for x in jax.tree.leaves(tree)]


def plain_jit(
    fun: Callable[[Any, Any], Any],
    state_sharding: jax.sharding.Sharding,
    batch_sharding: jax.sharding.Sharding,
):
  """`fun(state, batch) -> (state, metrics)` jitted: state donated, outputs like the state.

  The step without the disk cache (and what `CachedStep` runs when it cannot export).
  """
  return jax.jit(
      fun,
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, state_sharding),
      donate_argnums=(0,),
  )


class CachedStep:
  """`step(state, batch) -> (state, metrics)`, jitted, its lowering cached on disk.

  Behaves as `plain_jit(fun, state_sharding, batch_sharding)`, with `metrics` a flat dict of
  arrays (replicated like the state). The first call prepares the program: it loads the exported
  step whose key matches, or traces `fun`, exports and saves it. Either way the program
  run is the exported one, so a cold and a warm process run the same computation.

  Args:
    fun: (state, batch) -> (new_state, metrics); new_state has the structure of state.
    state_sharding: sharding of every state leaf (and of every output).
    batch_sharding: sharding of every batch leaf.
    key: what `fun` is built from (e.g. `config_key(config)`); the cache is only as sound
      as this key: everything `fun` closes over must be determined by it and the sources.
    cache_dir: folder of the exported steps; None = no cache (trace every process).
  """

  def __init__(
      self,
      fun: Callable[[Any, Any], Any],
      state_sharding: jax.sharding.Sharding,
      batch_sharding: jax.sharding.Sharding,
      key: str,
      cache_dir: Optional[str],
  ):
    self._fun = fun
    self._state_sharding = state_sharding
    self._batch_sharding = batch_sharding
    self._key = key
    self._cache_dir = cache_dir
    self._jitted = None  # the program run, set by _program
    self.loaded_from_cache = None  # after the first call: True (loaded) or False (traced)

  def file_for(self, state, batch) -> Optional[str]:
    """Path of the exported step for these arguments (None without a cache folder)."""
    if not self._cache_dir:
      return None
    parts = dict(
        format=FORMAT,
        key=self._key,
        sources=source_digest(),
        versions=_versions(),
        flags=lowering_flags(),
        backend=jax.default_backend(),
        devices=[str(d.device_kind) for d in jax.devices()],
        processes=jax.process_count(),
        tree=str(jax.tree.structure((state, batch))),
        leaves=_describe((state, batch)),
        shardings=[repr(self._state_sharding), repr(self._batch_sharding)],
        device_ids=[
            sorted(d.id for d in s.device_set) for s in (self._state_sharding, self._batch_sharding)
        ],
    )
    name = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return os.path.join(self._cache_dir, f'step-{name}.bin')

  def _load(self, path: str):
    """(exported, metric names) from `path`; None if it is missing (silently) or cannot be used
    (with a warning)."""
    try:
      with open(path, 'rb') as f:
        header = json.loads(f.readline())
        exported = jax.export.deserialize(bytearray(f.read()))
      return exported, list(header['metrics'])
    except FileNotFoundError:
      return None
    except Exception as error:  # pylint: disable=broad-except
      logging.warning(
          'Exported train step %s is unusable (%s); tracing the step instead.', path, error
      )
      return None

  def _export(self, state, batch):
    """(exported, metric names): traces `fun` over flat leaves and exports it."""
    state_leaves, state_tree = jax.tree.flatten(state)
    batch_leaves, batch_tree = jax.tree.flatten(batch)
    names: List[str] = []

    def flat(state_leaves, batch_leaves):
      new_state, metrics = self._fun(
          jax.tree.unflatten(state_tree, state_leaves), jax.tree.unflatten(batch_tree, batch_leaves)
      )
      new_leaves, new_tree = jax.tree.flatten(new_state)
      if new_tree != state_tree:
        raise ValueError(f'the step returned a state of another structure: {new_tree}')
      if not isinstance(metrics, dict):
        raise ValueError(f'the step must return metrics as a dict, got {type(metrics)}')
      names.extend(sorted(metrics))
      return new_leaves, [metrics[name] for name in names]

    lowered_fn = jax.jit(
        flat,
        in_shardings=(self._state_sharding, self._batch_sharding),
        out_shardings=self._state_sharding,
        donate_argnums=(0,),
    )
    return jax.export.export(lowered_fn)(state_leaves, batch_leaves), names

  @staticmethod
  def _save(path: str, exported, names: List[str]) -> bool:
    """Writes the file atomically (readers never see half of it); False if it could not.

    The temporary name is unique to this host, process and call, so writers never share one.
    """
    temporary = f'{path}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}.tmp'
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(temporary, 'wb') as f:
        f.write(json.dumps(dict(metrics=names)).encode() + b'\n')
        f.write(exported.serialize())
      os.replace(temporary, path)
      return True
    except OSError as error:
      logging.warning('Could not save the exported train step to %s: %s', path, error)
      if os.path.exists(temporary):
        os.remove(temporary)
      return False

  def _prepare(self, state, batch):
    path = self.file_for(state, batch)
    found = self._load(path) if path else None
    self.loaded_from_cache = found is not None
    if found:
      exported, names = found
      logging.info('Train step loaded (not traced) from %s.', path)
    else:
      try:
        exported, names = self._export(state, batch)
      except Exception as error:  # pylint: disable=broad-except
        # E.g. a host callback, which jax.export refuses; an error of the step itself
        # is raised again by the plain jit.
        logging.warning('The train step cannot be exported (%s); it is traced every run.', error)
        return plain_jit(self._fun, self._state_sharding, self._batch_sharding)
      # One writer: every process exports the same program, process 0 keeps it.
      if path and jax.process_index() == 0 and self._save(path, exported, names):
        logging.info('Train step traced and saved to %s.', path)
    state_tree = jax.tree.structure(state)

    def run(state, batch):
      new_leaves, metric_values = exported.call(jax.tree.leaves(state), jax.tree.leaves(batch))
      return jax.tree.unflatten(state_tree, new_leaves), dict(zip(names, metric_values))

    return jax.jit(run, donate_argnums=(0,))

  def _program(self, state, batch):
    """The jitted step, prepared (loaded or exported) on the first call."""
    if self._jitted is None:
      self._jitted = self._prepare(state, batch)
    return self._jitted

  def lower(self, state, batch):
    """The jitted program's `Lowered` (prepares it first: loads or exports)."""
    return self._program(state, batch).lower(state, batch)

  def __call__(self, state, batch):
    return self._program(state, batch)(state, batch)
