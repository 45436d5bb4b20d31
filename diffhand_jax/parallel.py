"""Device mesh, shardings and host->device batch placement for data parallelism.

Two equivalent paths (config.train.parallelism):
- 'jit':  one program over a 1-D `data` mesh; the batch is a global jax.Array
          sharded on its leading axis, parameters are replicated.
- 'pmap': the card's classic version; the per-process batch is reshaped to
          [local_devices, per_device, ...] and parameters carry a leading
          device axis.
"""

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from diffhand_jax import step_cache

DATA_AXIS = 'data'
PARALLELISMS = ('jit', 'pmap')


def make_data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all global devices).

  Auto axis types: with the (default) Explicit types every reshape/reduction of
  a sharded value would need an explicit out_sharding; data parallelism needs
  none of that.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(
      (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(batch_size: int, num_shards: int, what: str):
  if batch_size % num_shards:
    raise ValueError(
        f'{what}={batch_size} is not divisible by the number of '
        f'devices/processes ({num_shards})'
    )


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over `mesh`.

  Args:
    local_batch: dict of arrays [local_batch, ...] (this process's share).
  Returns:
    dict of jax.Arrays [local_batch * process_count, ...], examples in
    process-major order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


def pmap_batch(local_batch: dict, num_local_devices: Optional[int] = None) -> dict:
  """[B, ...] -> [local_devices, B / local_devices, ...] for pmap."""
  n = num_local_devices or jax.local_device_count()

  def split(x):
    x = np.asarray(x)
    check_batch_divisible(x.shape[0], n, 'per-process batch')
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return jax.tree.map(split, local_batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places every leaf, whole, on every device of `mesh` (jit path).

  Always copies: the train step donates the placed state, which must not
  delete the caller's arrays. (device_put alone reuses a buffer that already
  sits on one of the mesh devices, even with may_alias=False, in jax 0.10.)
  """
  return jax.device_put(jax.tree.map(jnp.copy, tree), replicated_sharding(mesh))


def pmap_replicate(tree: Any, devices: Optional[Sequence[jax.Device]] = None) -> Any:
  """Adds a leading device axis; copy i lives on local device i (pmap path).

  (`jax.device_put_replicated` is gone in jax 0.10: a NamedSharding over a mesh
  of the local devices places one slice per device.)
  """
  devices = list(jax.local_devices() if devices is None else devices)
  sharding = NamedSharding(jax.sharding.Mesh(np.array(devices), (DATA_AXIS,)), P(DATA_AXIS))

  def put(x):
    x = np.asarray(x)
    return jax.device_put(np.broadcast_to(x[None], (len(devices),) + x.shape), sharding)

  return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
  """First copy of every leaf of a pmap-replicated tree."""
  return jax.tree.map(lambda x: x[0], tree)


class DataParallel(NamedTuple):
  """A step function compiled for one of the two data-parallel paths.

  step: (placed_state, placed_batch) -> (placed_state, metrics); the input state
    is donated; metrics are device scalars, identical on every device.
  put_state: a single-copy state -> placed (replicated) state.
  put_batch: a per-process numpy batch -> placed batch.
  get_state: placed state -> single-copy state (to save or evaluate).
  num_devices: the global number of devices the batch is split over.
  """

  step: Callable[[Any, Any], Tuple[Any, Any]]
  put_state: Callable[[Any], Any]
  put_batch: Callable[[dict], Any]
  get_state: Callable[[Any], Any]
  num_devices: int


def data_parallel(
    step_fn: Callable[..., Tuple[Any, Any]],
    parallelism: str,
    devices: Optional[Sequence[jax.Device]] = None,
    cache_key: Optional[str] = None,
) -> DataParallel:
  """Compiles `step_fn(state, batch, axis_name=...)` for 'jit' or 'pmap'.

  `step_fn` averages its gradients and metrics over `axis_name` when it is not
  None (pmap); under jit it sees the global batch and needs no collective.

  Args:
    step_fn: the per-step function; must accept `axis_name` as a keyword.
    parallelism: 'jit' or 'pmap'.
    devices: the devices to use (default all); e.g. one device for a
      single-device reference run.
    cache_key: 'jit' only: what step_fn is built from (`step_cache.config_key`); with it
      and JAX's compilation cache on, the lowered step is kept on disk
      (`step_cache.CachedStep`) and a later process skips tracing it.
  """
  if parallelism == 'jit':
    mesh = make_data_mesh(devices)
    cache_dir = step_cache.default_cache_dir()
    if cache_key is not None and cache_dir:
      step = step_cache.CachedStep(
          functools.partial(step_fn, axis_name=None),
          replicated_sharding(mesh),
          batch_sharding(mesh),
          key=cache_key,
          cache_dir=cache_dir,
      )
    else:
      step = step_cache.plain_jit(
          functools.partial(step_fn, axis_name=None),
          replicated_sharding(mesh),
          batch_sharding(mesh),
      )
    return DataParallel(
        step=step,
        put_state=lambda state: replicate(state, mesh),
        put_batch=lambda batch: global_batch(batch, mesh),
        get_state=lambda state: state,
        num_devices=mesh.size,
    )
  if parallelism == 'pmap':
    local = list(jax.local_devices() if devices is None else devices)
    # devices=None lets pmap span every process's devices (multi-host).
    pstep = jax.pmap(
        functools.partial(step_fn, axis_name=DATA_AXIS),
        axis_name=DATA_AXIS,
        devices=devices,
        donate_argnums=(0,),
    )

    def step(state, batch):
      state, metrics = pstep(state, batch)
      return state, unreplicate(metrics)

    return DataParallel(
        step=step,
        put_state=lambda state: pmap_replicate(state, local),
        put_batch=lambda batch: pmap_batch(batch, len(local)),
        get_state=unreplicate,
        num_devices=len(local) * jax.process_count(),
    )
  raise ValueError(
      f'config.train.parallelism must be one of {PARALLELISMS}, ' f'got {parallelism!r}'
  )


def launched_by_cluster(environ: Mapping[str, str]) -> bool:
  """Whether this process is one of several started by a cluster launcher.

  Only then does `jax.distributed.initialize()` have a coordinator to find; on
  a plain machine (including a one-task SLURM allocation) it must not run.
  Recognised: an explicit JAX_COORDINATOR_ADDRESS, a SLURM step with several
  tasks, Open MPI with several ranks, and multi-host Cloud TPU slices.
  """

  def count(key):
    try:
      return int(environ.get(key, '1'))
    except ValueError:
      return 1

  if environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if 'SLURM_STEP_ID' in environ and count('SLURM_NTASKS') > 1:
    return True
  if count('OMPI_COMM_WORLD_SIZE') > 1:
    return True
  return ',' in environ.get('TPU_WORKER_HOSTNAMES', '')


def distributed_arguments(environ: Mapping[str, str]) -> dict:
  """Keyword arguments for `jax.distributed.initialize` from the environment.

  JAX reads JAX_COORDINATOR_ADDRESS itself but not the process count and index, which a job
  started by hand (e.g. two processes on one machine) has no cluster launcher to tell it:
  JAX_NUM_PROCESSES and JAX_PROCESS_ID give them. Without them, {} leaves everything to
  JAX's cluster detection (SLURM, Open MPI, Cloud TPU).
  """
  arguments = {}
  for key, name in (('JAX_NUM_PROCESSES', 'num_processes'), ('JAX_PROCESS_ID', 'process_id')):
    if key in environ:
      try:
        arguments[name] = int(environ[key])
      except ValueError:
        raise ValueError(f'{key} must be an integer, got {environ[key]!r}') from None
  return arguments
