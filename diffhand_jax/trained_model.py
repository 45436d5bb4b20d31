"""Which model a checkpoint was trained as: evaluation and prediction build exactly that one.

`adopt_trained_model` takes every field that defines the trained function from the config saved
with the checkpoint (a warning names each), and stops the run when a command-line flag
contradicts one.
"""

import json
from typing import List, Sequence

from absl import logging
import ml_collections

from diffhand_jax import checkpointing

# config.model keys that change how the model computes or is initialised, not its function:
# `adopt_trained_model` leaves them as the command line says.
COMPUTE_ONLY_MODEL_KEYS = ('dtype', 'remat', 'pretrained_path', 'cpu_kernels')
# Fields outside config.model that define the function a checkpoint was trained as: the
# variant (Table 4), the diffusion space and schedule, the hand model's joints and the input
# (crop size, synthetic render size, crop margin).
TRAINED_FUNCTION_FIELDS = (
    'decoder',
    'diffusion',
    'vertex_scale',
    'tip_vertex_ids',
    'mano_seed',
    'schedule.num_timesteps',
    'schedule.cosine_s',
    'data.image_size',
    'data.render_size',
    'data.crop_margin',
)


def trained_function_fields(config: ml_collections.ConfigDict) -> List[str]:
  """Dotted names of every config field that defines the trained function: each
  `config.model` key but the compute-only ones, and TRAINED_FUNCTION_FIELDS."""
  model = [f'model.{key}' for key in config.model if key not in COMPUTE_ONLY_MODEL_KEYS]
  return model + list(TRAINED_FUNCTION_FIELDS)


def _lookup(tree: dict, field: str):
  """(True, value) of a dotted field in a nested dict, or (False, None) when it is absent."""
  node = tree
  for part in field.split('.'):
    if not isinstance(node, dict) or part not in node:
      return False, None
    node = node[part]
  return True, node


def adopt_trained_model(
    config: ml_collections.ConfigDict, workdir: str, explicit: Sequence[str] = ()
) -> ml_collections.ConfigDict:
  """`config` with the model the checkpoint in `workdir` was trained as.

  Evaluation and prediction build the model from the command-line config; a checkpoint must be
  evaluated as the function it was trained as (a direct regressor as a regressor, at its
  vertex scale, crop size, ...). Every field of `trained_function_fields` whose saved value
  differs is taken from the checkpoint's config with a warning naming it, unless the user set
  that field on the command line (`explicit`): then the conflict stops the run with an error
  naming it. Fields the saved config lacks (older runs) stay as given.

  Args:
    config: the command line's config.
    workdir: the run (or exported model) to evaluate.
    explicit: dotted names of the fields set on the command line (`launch.py` passes its
      `--config.*` overrides).

  Returns:
    A copy of `config` (the same values when the checkpoint has no config).

  Raises:
    ValueError: a field set on the command line differs from the trained model's.
  """
  saved = checkpointing.restore_config(workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  if not saved:
    return config
  given = json.loads(config.to_json_best_effort())
  for field in trained_function_fields(config):
    found, value = _lookup(saved, field)
    if not found or value == _lookup(given, field)[1]:
      continue
    section, _, key = field.rpartition('.')
    node = config[section] if section else config
    old = node[key]
    if field in explicit:
      raise ValueError(
          f'{workdir} was trained with {field}={value!r}, but the command line sets '
          f'{field}={old!r}: a checkpoint is evaluated only as the model it was trained as '
          '(drop the flag, or point --workdir at a run trained with it)'
      )
    logging.warning('%s was trained with %s=%r; using it instead of %r', workdir, field, value, old)
    node[key] = type(old)(value) if isinstance(old, (tuple, float)) else value
  return config
