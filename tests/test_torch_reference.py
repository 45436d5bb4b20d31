"""benchmarks/torch_reference.py: the PyTorch twin has our parameters and computes our outputs.

Optional extra (torch): runs under `make test-torch`; skipped with the reason otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='optional extra torch not installed (make test-torch)')
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import torch_reference
from diffhand_jax import models


def _flax_and_torch(config):
  model = models.build_model(config)
  size = config.data.image_size
  params = models.init_params(model, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  return model, params, torch_reference.build_torch_model(config, model)


def _vit_config():
  config = torch_reference.get_config('smoke')
  config.model.encoder = 'vit'
  config.model.encoder_size = 'micro'
  return config


@pytest.fixture(scope='module')
def smoke():
  """(config, Flax model, params) of the smoke configuration, built once."""
  config = torch_reference.get_config('smoke')
  model, params, _ = _flax_and_torch(config)
  return config, model, params


@pytest.mark.parametrize('encoder', ['resnet', 'vit'])
def test_same_parameters_and_outputs(encoder, smoke):
  if encoder == 'resnet':
    config, model, params = smoke
    torch_model = torch_reference.build_torch_model(config, model)
  else:
    config = _vit_config()
    model, params, torch_model = _flax_and_torch(config)
  flax_count, torch_count = torch_reference.check_parameter_counts('smoke', params, torch_model)
  assert flax_count == torch_count == torch_reference.count_flax(params) > 100_000
  torch_reference.load_flax_params(torch_model, params)  # raises on any shape mismatch

  inputs = torch_reference.make_inputs(config, 2, model.num_points)
  out = jax.jit(model.apply)({'params': params}, inputs['images'], inputs['x_t'], inputs['t'])
  batch = torch_reference.torch_batch(inputs, torch.device('cpu'))
  with torch.no_grad():
    out_torch = torch_model(batch['images'], batch['x_t'], batch['t'])
  assert set(out_torch) == set(out) == {'x0', 'camera', 'aux_joints'}
  assert tuple(out_torch['x0'].shape) == (2, model.num_points, 3)
  for key in out:
    assert tuple(out_torch[key].shape) == out[key].shape, key
    np.testing.assert_allclose(out_torch[key].numpy(), np.asarray(out[key]), atol=1e-4, err_msg=key)


def test_parameter_mismatch_fails_loudly(smoke):
  _, model, params = smoke
  wider = torch_reference.get_config('smoke')
  wider.model.mlp_ratio = 2  # a decoder with other MLP widths
  torch_model = torch_reference.build_torch_model(wider, model)
  with pytest.raises(ValueError, match='parameter counts differ'):
    torch_reference.check_parameter_counts('smoke', params, torch_model)
  with pytest.raises(ValueError, match='fc1'):
    torch_reference.load_flax_params(torch_model, params)


def test_torch_sampler_outputs(smoke):
  config, model, params = smoke
  torch_model = torch_reference.build_torch_model(config, model)
  torch_reference.load_flax_params(torch_model, params)
  images = torch_reference.make_inputs(config, 1, model.num_points)['images']
  mean, joints, spread, camera = torch_reference.torch_sampler(
      torch_model, config, images, torch.device('cpu'), 3, compiled=False, compile_mode='default'
  )()
  assert tuple(mean.shape) == (1, model.num_points, 3) and tuple(joints.shape) == (1, 21, 3)
  assert tuple(spread.shape) == (1, model.num_points) and tuple(camera.shape) == (1, 3)
  # Root-centred on the regressed wrist, as sampling.sample: joint 0 is zero.
  np.testing.assert_allclose(joints[:, 0].numpy(), 0.0, atol=1e-6)
  assert torch.all(spread > 0)  # three hypotheses from different noise


def test_each_framework_in_its_own_process(tmp_path, capsys):
  """The default `--isolation=process`: one child per framework, timings merged into one table."""
  out = tmp_path / 'timings.json'
  summaries = torch_reference.main(
      [
          '--configs=smoke',
          '--frameworks=jax,eager',
          '--repeats=2',
          '--skip_sampling',
          '--device=cpu',
          f'--results_json={out}',
      ]
  )
  results = summaries['smoke']['results']['train']
  for framework in ('jax', 'eager'):
    first, repeats = results[framework]  # a failure would be a message, not a pair
    assert first > 0 and len(repeats) == 2 and min(repeats) > 0
  assert 'compile' not in results
  printed = capsys.readouterr().out
  assert 'each framework in a process of its own' in printed
  row = next(line for line in printed.splitlines() if line.startswith('| smoke ('))
  cells = [c.strip() for c in row.strip('|').split('|')]
  ratio = np.median(results['jax'][1]) / np.median(results['eager'][1])
  assert cells[5] == f'{ratio:.2f}' and cells[6] == '-'
  assert out.exists()
