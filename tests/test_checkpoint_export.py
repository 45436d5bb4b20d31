"""export.export_params: a small evaluation-only copy of a run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import synthetic
from diffhand_jax import checkpointing
from diffhand_jax import export
from diffhand_jax import trained_model
from diffhand_jax import models


def _folder_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize('with_ema', [False, True])
def test_export_keeps_the_evaluated_params_and_the_config(tmp_path, with_ema):
  rng = np.random.default_rng(0)
  params = {'layer': {'kernel': rng.normal(size=(64, 32)).astype(np.float32)}}
  ema = {'layer': {'kernel': rng.normal(size=(64, 32)).astype(np.float32)}}
  state = {
      'step': jnp.asarray(7, jnp.int32),
      'params': params,
      'opt_state': {'mu': params, 'nu': params},
      'ema_params': ema if with_ema else None,
      'rng': jax.random.PRNGKey(0),
  }
  config = synthetic.get_config('smoke')
  run, out = str(tmp_path / 'run'), str(tmp_path / 'out')
  with checkpointing.make_manager(run) as manager:
    checkpointing.save(manager, 7, state, config)
    manager.wait_until_finished()

  assert export.export_params(run, out) == 7
  exported = checkpointing.restore_params(out)
  expected = ema if with_ema else params
  np.testing.assert_array_equal(exported['layer']['kernel'], expected['layer']['kernel'])
  assert checkpointing.latest_step(out) == 7
  assert _folder_bytes(out) < _folder_bytes(run)
  with checkpointing.make_manager(out, read_only=True) as manager:
    saved = manager.restore(7, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  assert saved['model']['width'] == config.model.width


def test_export_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    export.export_params(str(tmp_path / 'empty'), str(tmp_path / 'out'))


def test_eval_and_predict_adopt_the_trained_model(tmp_path, caplog):
  """`adopt_trained_model` takes config.model and data.image_size from the checkpoint's saved
  config (with a warning each), leaves compute-only keys and everything else as given."""
  state = {'step': jnp.asarray(3, jnp.int32), 'params': {'w': np.zeros((2,), np.float32)}}
  trained = synthetic.get_config('smoke')
  trained.model.space_to_depth, trained.data.image_size = 2, 128
  trained.model.width, trained.model.dtype = 48, 'bfloat16'
  trained.sampling.num_hypotheses = 4
  run = str(tmp_path / 'run')
  assert trained_model.adopt_trained_model(synthetic.get_config('smoke'), run).model.width == (
      synthetic.get_config('smoke').model.width
  )  # no checkpoint: unchanged
  with checkpointing.make_manager(run) as manager:
    checkpointing.save(manager, 3, state, trained)
    manager.wait_until_finished()

  given = synthetic.get_config('smoke')
  with caplog.at_level('WARNING'):
    adopted = trained_model.adopt_trained_model(given, run)
  assert (adopted.model.space_to_depth, adopted.data.image_size, adopted.model.width) == (
      2,
      128,
      48,
  )
  assert adopted.model.dtype == given.model.dtype  # compute-only: as given
  assert adopted.sampling.num_hypotheses == given.sampling.num_hypotheses  # not the model
  assert given.data.image_size != 128  # the argument is not modified
  assert adopted.model.to_dict() == {**given.model.to_dict(), 'space_to_depth': 2, 'width': 48}
  assert 'model.space_to_depth=2' in caplog.text and 'data.image_size=128' in caplog.text
  assert 'dtype' not in caplog.text


def _saved_run(tmp_path, trained):
  run = str(tmp_path / 'run')
  state = {'step': jnp.asarray(3, jnp.int32), 'params': {'w': np.zeros((2,), np.float32)}}
  with checkpointing.make_manager(run) as manager:
    checkpointing.save(manager, 3, state, trained)
    manager.wait_until_finished()
  return run


@pytest.mark.parametrize(
    'field,value',
    [('diffusion', False), ('decoder', 'vanilla'), ('vertex_scale', 0.2)],
)
def test_the_trained_function_is_adopted_or_a_conflicting_flag_stops(
    tmp_path, caplog, field, value
):
  """A direct regressor, a vanilla decoder or another vertex scale is evaluated as trained."""
  trained = synthetic.get_config('smoke')
  trained[field] = value
  trained.schedule.num_timesteps = 500
  run = _saved_run(tmp_path, trained)
  given = synthetic.get_config('smoke')
  assert given[field] != value
  with caplog.at_level('WARNING'):
    adopted = trained_model.adopt_trained_model(given, run)
  assert adopted[field] == value and adopted.schedule.num_timesteps == 500
  assert f'{field}={value!r}' in caplog.text
  model = models.build_model(adopted)
  built = {'diffusion': model.diffusion, 'decoder': model.decoder.kind}
  built['vertex_scale'] = model.vertex_scale
  assert built[field] == value and model.num_timesteps == 500
  # Set on the command line to the other value: an error naming the field, nothing adopted.
  with pytest.raises(ValueError, match=f'trained with {field}={value!r}.*sets {field}='):
    trained_model.adopt_trained_model(given, run, explicit=[field, 'sampling.eta'])
  # The same value on the command line is no conflict.
  given[field] = value
  assert trained_model.adopt_trained_model(given, run, explicit=[field])[field] == value


def test_every_field_that_defines_the_function_is_adopted(tmp_path):
  trained = synthetic.get_config('smoke')
  trained.data.render_size, trained.data.crop_margin, trained.mano_seed = 96, 1.6, 3
  trained.model.cpu_kernels = not trained.model.cpu_kernels  # compute only: not adopted
  adopted = trained_model.adopt_trained_model(
      synthetic.get_config('smoke'), _saved_run(tmp_path, trained)
  )
  assert (adopted.data.render_size, adopted.data.crop_margin, adopted.mano_seed) == (96, 1.6, 3)
  assert adopted.model.cpu_kernels == synthetic.get_config('smoke').model.cpu_kernels
  fields = trained_model.trained_function_fields(adopted)
  assert {'diffusion', 'decoder', 'vertex_scale', 'schedule.cosine_s', 'model.width'} <= set(fields)
  assert not {'model.dtype', 'model.cpu_kernels', 'sampling.num_sampling_steps'} & set(fields)
