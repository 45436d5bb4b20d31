"""step_cache.CachedStep: a warm process runs the exported step without tracing, same numbers."""

import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffhand_jax import parallel
from diffhand_jax import step_cache

OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, weight_decay=1e-2))


def make_step(traces):
  """An optax step over a two-layer model; appends to `traces` each time it is traced."""

  def step(state, batch):
    traces.append(1)
    params, opt_state = state

    def loss_fn(params):
      hidden = jnp.tanh(batch['x'] @ params['w1'])
      return jnp.mean((hidden @ params['w2'] - batch['y']) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), dict(loss=loss, grad_norm=optax.global_norm(grads))

  return step


def initial(mesh):
  rng = np.random.default_rng(0)
  params = dict(w1=rng.normal(size=(3, 8)), w2=rng.normal(size=(8, 2)))
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = parallel.replicate((params, OPTIMIZER.init(params)), mesh)
  batch = dict(x=rng.normal(size=(8, 3)), y=rng.normal(size=(8, 2)))
  batch = parallel.global_batch(jax.tree.map(lambda x: x.astype(np.float32), batch), mesh)
  return state, batch


def run(step, mesh, num_steps=3):
  """num_steps updates from the same start; returns (state, list of metrics) on the host."""
  state, batch = initial(mesh)
  history = []
  for _ in range(num_steps):
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def cached(step_fn, mesh, key, cache_dir):
  return step_cache.CachedStep(
      step_fn,
      parallel.replicated_sharding(mesh),
      parallel.batch_sharding(mesh),
      key=key,
      cache_dir=cache_dir,
  )


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('num_devices', [1, 4])
def test_warm_start_loads_without_tracing_and_matches_jit(tmp_path, num_devices):
  mesh = parallel.make_data_mesh(jax.devices()[:num_devices])
  traces = []
  step_fn = make_step(traces)
  reference = jax.jit(
      step_fn,
      in_shardings=(parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)),
      out_shardings=(parallel.replicated_sharding(mesh), parallel.replicated_sharding(mesh)),
      donate_argnums=(0,),
  )
  expected = run(reference, mesh)
  assert len(traces) == 1

  cold = cached(step_fn, mesh, 'key-a', str(tmp_path))
  cold_result = run(cold, mesh)
  assert cold.loaded_from_cache is False and len(traces) == 2
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].startswith('step-')

  warm = cached(step_fn, mesh, 'key-a', str(tmp_path))  # a new process would do the same
  warm_result = run(warm, mesh)
  assert warm.loaded_from_cache is True
  assert len(traces) == 2, 'the warm start traced the step function'
  assert sorted(warm_result[1][0]) == ['grad_norm', 'loss']
  assert_same(cold_result, expected)
  assert_same(warm_result, expected)


def test_key_arguments_and_devices_select_the_file(tmp_path):
  mesh = parallel.make_data_mesh(jax.devices()[:1])
  step = cached(make_step([]), mesh, 'key-a', str(tmp_path))
  state, batch = initial(mesh)
  path = step.file_for(state, batch)
  assert path == cached(make_step([]), mesh, 'key-a', str(tmp_path)).file_for(state, batch)
  assert path != cached(make_step([]), mesh, 'key-b', str(tmp_path)).file_for(state, batch)
  wider = dict(batch, x=jnp.concatenate([batch['x'], batch['x']]))
  assert path != step.file_for(state, wider)
  other = parallel.make_data_mesh(jax.devices()[1:2])
  assert path != cached(make_step([]), other, 'key-a', str(tmp_path)).file_for(*initial(other))
  assert cached(make_step([]), mesh, 'key-a', None).file_for(state, batch) is None


def test_lowering_flags_select_the_file(tmp_path, monkeypatch):
  mesh = parallel.make_data_mesh(jax.devices()[:1])
  step = cached(make_step([]), mesh, 'key-a', str(tmp_path))
  state, batch = initial(mesh)
  path = step.file_for(state, batch)
  monkeypatch.setenv(
      'XLA_FLAGS', os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_enable_fast_math=false'
  )
  assert step.file_for(state, batch) != path
  monkeypatch.undo()
  assert step.file_for(state, batch) == path
  precision = jax.config.jax_default_matmul_precision
  jax.config.update('jax_default_matmul_precision', 'highest')
  try:
    assert step.file_for(state, batch) != path
  finally:
    jax.config.update('jax_default_matmul_precision', precision)


def test_only_process_zero_writes(tmp_path, monkeypatch):
  mesh = parallel.make_data_mesh(jax.devices()[:1])
  traces = []
  expected = run(cached(make_step(traces), mesh, 'key-a', str(tmp_path / 'zero')), mesh)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  other = cached(make_step(traces), mesh, 'key-a', str(tmp_path / 'one'))
  result = run(other, mesh)
  assert other.loaded_from_cache is False and len(traces) == 2
  assert not (tmp_path / 'one').exists() or not os.listdir(tmp_path / 'one')
  assert_same(result, expected)


def test_concurrent_writers_leave_one_whole_file(tmp_path):
  mesh = parallel.make_data_mesh(jax.devices()[:1])
  state, batch = initial(mesh)
  step = cached(make_step([]), mesh, 'key-a', str(tmp_path))
  exported, names = step._export(state, batch)  # pylint: disable=protected-access
  path = step.file_for(state, batch)
  results = []
  writers = [
      threading.Thread(target=lambda: results.append(step._save(path, exported, names)))
      for _ in range(8)
  ]
  for writer in writers:
    writer.start()
  for writer in writers:
    writer.join()
  assert results == [True] * 8
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left behind
  warm = cached(make_step([]), mesh, 'key-a', str(tmp_path))
  run(warm, mesh)
  assert warm.loaded_from_cache is True


def test_a_file_removed_before_reading_is_traced_quietly(tmp_path, caplog):
  mesh = parallel.make_data_mesh(jax.devices()[:1])
  step = cached(make_step([]), mesh, 'key-a', str(tmp_path))
  with caplog.at_level('WARNING'):
    assert step._load(str(tmp_path / 'step-gone.bin')) is None  # pylint: disable=protected-access
  assert not caplog.text


def test_unreadable_file_is_reported_and_the_step_traced(tmp_path, caplog):
  mesh = parallel.make_data_mesh(jax.devices()[:1])
  traces = []
  expected = run(cached(make_step(traces), mesh, 'key-a', str(tmp_path)), mesh)
  (path,) = [os.path.join(tmp_path, name) for name in os.listdir(tmp_path)]
  with open(path, 'r+b') as f:
    f.seek(40)
    f.write(b'not a serialized program' * 4)
  step = cached(make_step(traces), mesh, 'key-a', str(tmp_path))
  with caplog.at_level('WARNING'):
    result = run(step, mesh)
  assert step.loaded_from_cache is False and len(traces) == 2
  assert 'unusable' in caplog.text and path in caplog.text
  assert_same(result, expected)


def test_config_key_follows_the_config_and_the_mano_file(tmp_path):
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config('smoke')
  key = step_cache.config_key(config)
  assert key == step_cache.config_key(synthetic.get_config('smoke'))
  config.optim.learning_rate = 0.5
  assert step_cache.config_key(config) != key
  mano = tmp_path / 'MANO_RIGHT.npz'
  mano.write_bytes(b'one')
  config.mano_path = str(mano)
  with_file = step_cache.config_key(config)
  mano.write_bytes(b'two')  # same path, other contents
  assert step_cache.config_key(config) != with_file


def test_a_step_that_cannot_be_exported_runs_as_plain_jit(tmp_path, caplog):
  mesh = parallel.make_data_mesh(jax.devices()[:1])
  traces = []
  step_fn = make_step(traces)
  expected = run(cached(step_fn, mesh, 'key-a', None), mesh)

  def with_callback(state, batch):
    state, metrics = step_fn(state, batch)
    jax.debug.callback(lambda loss: None, metrics['loss'])  # jax.export refuses host callbacks
    return state, metrics

  step = cached(with_callback, mesh, 'key-a', str(tmp_path))
  with caplog.at_level('WARNING'):
    result = run(step, mesh)
  assert 'cannot be exported' in caplog.text
  assert not os.listdir(tmp_path)
  assert_same(result, expected)


def test_an_unwritable_cache_folder_is_reported_and_training_goes_on(tmp_path, caplog):
  mesh = parallel.make_data_mesh(jax.devices()[:1])
  blocked = tmp_path / 'a_file'
  blocked.write_text('')
  expected = run(cached(make_step([]), mesh, 'key-a', None), mesh)
  with caplog.at_level('WARNING'):
    result = run(cached(make_step([]), mesh, 'key-a', str(blocked / 'exported')), mesh)
  assert 'Could not save the exported train step' in caplog.text
  assert_same(result, expected)
