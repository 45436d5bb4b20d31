"""Entry point: train, evaluate or predict with a config file.

  python launch.py --config=configs/synthetic.py:smoke --mode=train
  python launch.py --config=configs/synthetic.py:smoke --mode=eval
  python launch.py --config=configs/synthetic.py:smoke --mode=predict --input=photos/
  python launch.py --config=configs/synthetic.py --workdir=runs/demo --mode=demo
  python launch.py --config=configs/freihand.py --config.data.root=/data/FreiHAND \
      --config.decoder=vanilla --config.diffusion=False --workdir=runs/ablation

Re-running the same training command with the same --workdir resumes it.
"""

import importlib.util
import os
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from diffhand_jax import host_memory

config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with a variant: FILE[:variant].', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Run directory (default: runs/<config name>[_<variant>]).')
flags.DEFINE_enum(
    'mode',
    'train',
    ['train', 'eval', 'predict', 'demo'],
    'What to do (demo: train if needed, evaluate on an unseen seed, ' 'write pictures).',
)
flags.DEFINE_string('input', None, '--mode=predict: an image or a folder.')
flags.DEFINE_bool(
    'overwrite',
    False,
    'train: delete the workdir first (start over instead of '
    'resuming); predict: replace existing outputs.',
)
flags.DEFINE_string(
    'compilation_cache',
    os.path.join('~', '.cache', 'diffhand_jax', 'xla'),
    "JAX's persistent compilation cache ('' = off): a second run of the "
    'same program skips most of its compile time.',
)
flags.DEFINE_bool(
    'huge_pages',
    False,
    'CPU tool: re-execute once with transparent huge pages for XLA CPU buffers '
    '(diffhand_jax/host_memory.py; the same as DIFFHAND_HUGE_PAGES=1).',
)
FLAGS = flags.FLAGS


def enable_compilation_cache(jax, path: str):
  """Points JAX's persistent compilation cache at `path` (unless JAX_COMPILATION_CACHE_DIR
  is set already); programs that took over a second to compile are stored there."""
  if not path or os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def default_workdir(config_arg: str) -> str:
  """runs/<file stem>[_<variant>] from 'configs/freihand.py:smoke'."""
  path, _, variant = config_arg.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', f'{name}_{variant}' if variant else name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Imported after flag parsing so `--help` stays fast; each mode below imports only its own
  # modules for the same reason.
  import jax  # pylint: disable=g-import-not-at-top
  from diffhand_jax import logging_utils  # pylint: disable=g-import-not-at-top
  from diffhand_jax import parallel  # pylint: disable=g-import-not-at-top

  logging_utils.quiet_library_logs()
  enable_compilation_cache(jax, FLAGS.compilation_cache)

  if parallel.launched_by_cluster(os.environ):
    jax.distributed.initialize(**parallel.distributed_arguments(os.environ))
  config = FLAGS.config
  workdir = FLAGS.workdir or default_workdir(_config_argument())
  logging.info(
      'JAX devices: %d (%d local), process %d of %d; workdir %s',
      jax.device_count(),
      jax.local_device_count(),
      jax.process_index(),
      jax.process_count(),
      workdir,
  )

  if FLAGS.mode in ('train', 'demo'):
    from diffhand_jax import demo  # pylint: disable=g-import-not-at-top
    from diffhand_jax import train  # pylint: disable=g-import-not-at-top

    if FLAGS.overwrite and os.path.isdir(workdir) and jax.process_index() == 0:
      shutil.rmtree(workdir)
    if jax.process_count() > 1:  # nobody reads the workdir before it is gone
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices('workdir ready')
    os.makedirs(workdir, exist_ok=True)
    if FLAGS.mode == 'demo':
      demo.run(config, workdir)
    else:
      train.train_and_evaluate(config, workdir)
  elif FLAGS.mode == 'eval':
    from diffhand_jax import evaluate  # pylint: disable=g-import-not-at-top
    from diffhand_jax import trained_model  # pylint: disable=g-import-not-at-top

    config = trained_model.adopt_trained_model(config, workdir, overridden_fields(sys.argv))
    evaluate.evaluate_checkpoint(config, workdir)
  else:
    from diffhand_jax import predict  # pylint: disable=g-import-not-at-top
    from diffhand_jax import trained_model  # pylint: disable=g-import-not-at-top

    if not FLAGS.input:
      raise app.UsageError('--mode=predict needs --input=IMAGE_OR_FOLDER')
    config = trained_model.adopt_trained_model(config, workdir, overridden_fields(sys.argv))
    predict.predict(config, workdir, FLAGS.input, overwrite=FLAGS.overwrite)


def _config_argument() -> str:
  """The raw --config value (file[:variant]) as given on the command line."""
  return FLAGS['config'].serialize().partition('=')[2]


def overridden_fields(argv) -> list[str]:
  """Dotted config fields set on the command line: 'model.width' from '--config.model.width=8'."""
  return [arg[len('--config.') :].partition('=')[0] for arg in argv if arg.startswith('--config.')]


def unknown_config_keys(config, argv) -> list[str]:
  """The `--config.a.b=...` overrides in argv whose key path `config` does not have."""
  unknown = []
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.') :].partition('=')[0]
    node = config
    for part in path.split('.'):
      if not hasattr(node, 'keys') or part not in node.keys():
        known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(not a group)'
        unknown.append(f'unknown config key {path!r} (no {part!r}; known here: {known})')
        break
      node = node[part]
  return unknown


def parse_flags(argv):
  """absl flag parsing with errors that name the offending argument instead of a traceback.

  An unknown `--config.x.y` key (ml_collections raises a bare AttributeError) or a config file
  that fails to load (e.g. an unknown FILE:variant) ends the program with one clear message.
  """
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as error:
    config_args = [a for a in argv if a.startswith('--config=')]
    reasons = []
    if config_args:
      try:  # load the config file alone to tell an unknown key from a broken file
        reasons = unknown_config_keys(_load_config_file(config_args[-1]), argv)
      except (OSError, ImportError, AttributeError, KeyError, ValueError, TypeError) as inner:
        reasons = [f'{config_args[-1]}: {_last_line(inner)}']
    message = '; '.join(reasons) or _last_line(error)
    sys.exit(f'launch.py: bad command line: {message}\nPass --helpshort for the flags.')


def _load_config_file(config_arg: str):
  """get_config(variant) of '--config=FILE[:variant]', without any override applied."""
  path, _, variant = config_arg.partition('=')[2].partition(':')
  spec = importlib.util.spec_from_file_location('_config_file', path)
  if spec is None:
    raise ValueError(f'cannot read the config file {path!r}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None)


def _last_line(error) -> str:
  """The last non-empty line of an error's text (config-file errors carry a traceback)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else repr(error)


if __name__ == '__main__':
  if any(arg in ('--huge_pages', '--huge_pages=true', '--huge_pages=True') for arg in sys.argv):
    os.environ[host_memory.OPT_IN] = '1'
  host_memory.reexec_with_huge_pages()
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=parse_flags)
