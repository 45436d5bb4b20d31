"""launch.py helpers, cluster detection and the config files."""

import importlib
import os
import subprocess
import sys

from absl import flags
import pytest
from ml_collections import config_flags

from configs import common
from configs import dexycb
from configs import freihand
from configs import synthetic
from configs import freihand_depth
from configs import ho3d
import launch
from diffhand_jax import parallel
from diffhand_jax import input_pipeline

CONFIG_FILES = ('synthetic', 'freihand', 'freihand_depth', 'dexycb', 'ho3d')


@pytest.mark.parametrize(
    'environ, expected',
    [
        ({}, False),
        ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1', 'SLURM_STEP_ID': '0'}, False),
        ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, False),  # salloc, no srun step
        ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4', 'SLURM_STEP_ID': '0'}, True),
        ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, True),
        ({'OMPI_COMM_WORLD_SIZE': '2'}, True),
        ({'OMPI_COMM_WORLD_SIZE': '1'}, False),
        ({'TPU_WORKER_HOSTNAMES': 'localhost'}, False),
        ({'TPU_WORKER_HOSTNAMES': 't1,t2'}, True),
        ({'SLURM_NTASKS': 'garbage', 'SLURM_STEP_ID': '0'}, False),
    ],
)
def test_launched_by_cluster(environ, expected):
  assert parallel.launched_by_cluster(environ) is expected


def test_distributed_arguments_from_the_environment():
  environ = {'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1234', 'JAX_NUM_PROCESSES': '2'}
  assert parallel.distributed_arguments(dict(environ, JAX_PROCESS_ID='1')) == {
      'num_processes': 2,
      'process_id': 1,
  }
  assert parallel.distributed_arguments({'SLURM_NTASKS': '4'}) == {}  # JAX detects SLURM
  with pytest.raises(ValueError, match="JAX_PROCESS_ID must be an integer, got 'one'"):
    parallel.distributed_arguments(dict(environ, JAX_PROCESS_ID='one'))


def test_default_workdir():
  assert launch.default_workdir('configs/synthetic.py') == 'runs/synthetic'
  assert launch.default_workdir('configs/freihand.py:smoke') == ('runs/freihand_smoke')


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_config_files_build_both_variants(name):
  module = importlib.import_module(f'configs.{name}')
  real, smoke = module.get_config(), module.get_config('smoke')
  base = importlib.import_module('configs.synthetic').get_config()
  # Same schema as the shared base: no config file invents or drops keys.
  assert set(real.keys()) == set(base.keys()) == set(smoke.keys())
  assert smoke.train.num_steps < real.train.num_steps or name == 'synthetic'
  assert smoke.train.num_steps <= 10
  with pytest.raises(ValueError, match='unknown variant'):
    module.get_config('no_such_variant')


def test_paper_recipe_values():
  config = freihand.get_config()
  assert (config.data.name, config.model.encoder, config.data.image_size) == (
      'freihand',
      'deit',
      224,
  )
  assert config.train.global_batch_size == 64
  assert config.optim.learning_rate == 1e-4 and config.optim.weight_decay == 1e-4
  # 100 epochs of 130,240 images at 64 per step.
  assert config.train.num_steps == -(-100 * 130_240 // 64) == 203_500
  # Training recounts the prepared split and redoes the schedule for these epochs.
  assert config.train.num_epochs == 100
  assert freihand.get_config('smoke').train.num_epochs == 0  # the smoke variant: 4 steps
  assert config.sampling.num_sampling_steps == 10 and len(config.eval.tta_angles) == 3
  # Real data train with crop and colour augmentation; the synthetic default without it.
  augmentation = importlib.import_module('configs.synthetic').CROP_AUGMENTATION
  for real in (config, dexycb.get_config(), ho3d.get_config()):
    assert {key: real.data[key] for key in augmentation} == augmentation
  synthetic_data = importlib.import_module('configs.synthetic').get_config().data
  assert not any(synthetic_data[key] for key in augmentation)
  depth = freihand_depth.get_config()
  assert depth.model.use_depth and depth.init_from
  assert 'use_depth' not in depth.data  # one knob: config.model.use_depth
  assert depth.train.num_steps == common.steps_for(130_240, 5, 64)
  assert depth.train.num_epochs == 0  # fine-tuning keeps its written-down schedule
  assert dexycb.get_config().model.encoder == 'hrnet'
  assert ho3d.get_config().model.encoder == 'deit'
  assert ho3d.get_config('depth').model.use_depth
  assert ho3d.get_config('depth,smoke').train.num_steps <= 10


def _parse(argv):
  flag_values = flags.FlagValues()
  # sys_argv: the override flags are discovered from the command line.
  config_flags.DEFINE_config_file(
      'config', None, 'config', flag_values=flag_values, sys_argv=['launch'] + argv
  )
  flag_values(['launch'] + argv)
  return flag_values.config


def test_ablation_switches_from_the_command_line():
  config = _parse(
      [
          '--config=configs/synthetic.py:smoke',
          '--config.decoder=vanilla',
          '--config.diffusion=False',
          '--config.train.parallelism=pmap',
      ]
  )
  assert config.decoder == 'vanilla' and config.diffusion is False
  assert config.train.parallelism == 'pmap' and config.train.num_steps == 4


@pytest.mark.parametrize('name', ['dexycb', 'ho3d', 'freihand'])
def test_real_dataset_configs_need_only_their_root(name, tmp_path):
  """Each real-data config names a data set with a builder; without data.root the run stops
  saying so (not later, on a missing file)."""
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  assert config.data.name == name and config.data.root == ''
  config.data.tfds_data_dir = str(tmp_path / 'tfds')  # nothing prepared there
  config.mano_path = str(tmp_path / 'MANO_RIGHT.pkl')  # DexYCB / HO-3D need it first
  with pytest.raises(ValueError, match=f'config.data.root must point to the {name} files'):
    input_pipeline.get_builder(config)


def test_unknown_config_keys_are_named():
  config = importlib.import_module('configs.synthetic').get_config('smoke')
  argv = [
      'launch.py',
      '--config=configs/synthetic.py:smoke',
      '--config.train.num_steps=3',
      '--config.train.nonexistent=1',
      '--config.bogus.x=2',
      '--workdir=w',
  ]
  found = launch.unknown_config_keys(config, argv)
  assert len(found) == 2
  assert "'train.nonexistent'" in found[0] and 'num_steps' in found[0]
  assert "'bogus.x'" in found[1]
  assert not launch.unknown_config_keys(config, argv[:3])


@pytest.mark.parametrize(
    'args, expected',
    [
        (
            ['--config=configs/synthetic.py:smoke', '--config.train.nonexistent=1'],
            "unknown config key 'train.nonexistent'",
        ),
        (['--config=configs/synthetic.py:bogus'], "unknown variant 'bogus'"),
        (
            ['--config=configs/synthetic.py:smoke', '--config.train.num_steps=abc'],
            '--config.train.num_steps=abc',
        ),
    ],
)
def test_bad_command_lines_fail_with_one_clear_line(args, expected, tmp_path):
  result = subprocess.run(
      [sys.executable, 'launch.py', *args, f'--workdir={tmp_path}'],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert result.returncode != 0
  assert 'launch.py: bad command line:' in result.stderr and expected in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.listdir(tmp_path)  # nothing was started


def test_overridden_fields_are_the_config_flags():
  argv = [
      'launch.py',
      '--config=configs/synthetic.py',
      '--config.diffusion=False',
      '--config.model.width=8',
      '--workdir=runs/x',
      '--mode=eval',
  ]
  assert launch.overridden_fields(argv) == ['diffusion', 'model.width']


@pytest.mark.parametrize('name', ['freihand', 'dexycb', 'ho3d'])
def test_paper_recipes_warn_without_pretrained_weights(name, caplog):
  from diffhand_jax import train  # pylint: disable=g-import-not-at-top

  config = importlib.import_module(f'configs.{name}').get_config()
  config.model.pretrained_path = ''
  with caplog.at_level('WARNING'):
    assert train.warn_if_from_scratch(config)
  assert 'pretrained_path is empty' in caplog.text
  config.model.pretrained_path = '/weights/vit_large.safetensors'
  assert not train.warn_if_from_scratch(config)
  assert not train.warn_if_from_scratch(synthetic.get_config())
