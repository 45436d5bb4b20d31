"""Issue 13, "Two processes, one job": launch.py as two CPU processes of one JAX job.

Two processes with 2 fake CPU devices each find each other through jax.distributed on
127.0.0.1 (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; CPU collectives over
gloo, JAX's default on CPU) and train the smoke config. Both must end with the same parameters,
equal to one process with 4 devices and the same global batch, and only process 0 writes
checkpoints and logs.
"""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from diffhand_jax import checkpointing
from diffhand_jax import logging_utils

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_STEPS = 4
# The gradient all-reduce over 2 processes x 2 devices (gloo) adds the per-device partial sums
# in another order than one process's 4-device reduction: ~1e-7 relative per sum. Losses and
# gradient norms, which see that rounding directly, must agree to RTOL. Adam amplifies it in
# parameters whose gradient is near 0 (m / sqrt(v) flips sign: up to 2 lr per step), so the
# parameters are compared as a whole: relative L2 difference below PARAMS_RTOL.
RTOL = 1e-5
PARAMS_RTOL = 1e-4

# launch.py, with train_and_evaluate wrapped to dump this process's final parameters.
_DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import jax
    import numpy as np
    from absl import app, flags
    import launch
    from diffhand_jax import train

    dump = sys.argv.pop(1)
    original = train.train_and_evaluate

    def recording(config, workdir, **kwargs):
      state = original(config, workdir, periodic_eval=False)
      leaves = jax.tree_util.tree_leaves_with_path(state.params)
      np.savez(dump % jax.process_index(), **{{
          jax.tree_util.keystr(path): np.asarray(leaf.addressable_shards[0].data)
          for path, leaf in leaves
      }})
      print('FINISHED process', jax.process_index(), 'of', jax.process_count(), flush=True)
      return state

    train.train_and_evaluate = recording
    flags.mark_flags_as_required(['config'])
    app.run(launch.main, flags_parser=launch.parse_flags)
""")


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(driver, dump, workdir, tfds_dir, devices, **environ):
  env = dict(
      os.environ,
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
      JAX_PLATFORMS='cpu',
      TF_CPP_MIN_LOG_LEVEL='3',
      **environ,
  )
  return subprocess.Popen(
      [
          sys.executable,
          str(driver),
          str(dump),
          '--config=configs/synthetic.py:smoke',
          f'--workdir={workdir}',
          f'--config.data.tfds_data_dir={tfds_dir}',
          f'--config.train.num_steps={NUM_STEPS}',
          '--compilation_cache=',
          '--alsologtostderr',
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )


def _finish(*processes, timeout=900):
  """Waits for all (killing the rest once one fails or the time is up); returns the outputs."""
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=timeout)[0])
      assert process.returncode == 0, outputs[-1][-4000:]
  finally:
    for process in processes:
      if process.poll() is None:  # a peer of a failed process waits for it forever
        process.kill()
        process.communicate()
  return outputs


def _params(path):
  with np.load(path) as data:
    return {key: data[key] for key in data.files}


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_four_devices(tmp_path):
  driver = tmp_path / 'driver.py'
  driver.write_text(_DRIVER.format(root=ROOT))
  tfds_dir = tmp_path / 'tfds'

  # One process, 4 devices (it also renders the data set the two processes then read).
  (single,) = _finish(_start(driver, tmp_path / 'single_%d.npz', tmp_path / 'single', tfds_dir, 4))
  assert 'FINISHED process 0 of 1' in single

  coordinator = {'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{_free_port()}', 'JAX_NUM_PROCESSES': '2'}
  workdir = tmp_path / 'two'
  processes = [
      _start(
          driver,
          tmp_path / 'two_%d.npz',
          workdir,
          tfds_dir,
          2,
          JAX_PROCESS_ID=str(p),
          **coordinator,
      )
      for p in range(2)
  ]
  outputs = _finish(*processes)
  for p, output in enumerate(outputs):
    assert f'FINISHED process {p} of 2' in output, output[-3000:]
    assert 'JAX devices: 4 (2 local)' in output

  # Both processes hold the same parameters, equal to the one-process run up to reduction order.
  reference = _params(tmp_path / 'single_0.npz')
  shares = [_params(tmp_path / f'two_{p}.npz') for p in range(2)]
  assert set(shares[0]) == set(shares[1]) == set(reference)
  for key in reference:
    np.testing.assert_array_equal(shares[1][key], shares[0][key], err_msg=key)
  flat = lambda params: np.concatenate([np.ravel(params[key]) for key in sorted(reference)])
  difference = np.linalg.norm(flat(shares[0]) - flat(reference)) / np.linalg.norm(flat(reference))
  worst = max(float(np.max(np.abs(shares[0][k] - v))) for k, v in reference.items())
  print(f'params vs one process: relative L2 {difference:.3g}, largest element {worst:.3g}')
  assert difference < PARAMS_RTOL

  # Only process 0 logged progress and wrote metrics: each step once, with the same losses.
  assert f'step {NUM_STEPS}/{NUM_STEPS}' in outputs[0]
  assert 'step 1/' not in outputs[1]
  records = logging_utils.read_scalars(str(workdir), 'train')
  assert [r['step'] for r in records] == list(range(1, NUM_STEPS + 1))
  single_records = logging_utils.read_scalars(str(tmp_path / 'single'), 'train')
  for record, expected in zip(records, single_records):
    for name in ('loss', 'grad_norm'):
      np.testing.assert_allclose(record[name], expected[name], rtol=RTOL, err_msg=name)
  assert len(os.listdir(workdir / 'tensorboard' / 'train')) == 1
  # One checkpoint folder, written as one job, that restores the same parameters.
  assert checkpointing.latest_step(str(workdir)) == NUM_STEPS
  with checkpointing.make_manager(str(workdir), read_only=True) as manager:
    restored = checkpointing.restore_state(manager, NUM_STEPS)
  for key, value in jax.tree_util.tree_leaves_with_path(restored['params']):
    np.testing.assert_array_equal(value, shares[0][jax.tree_util.keystr(key)])
  # Orbax saves collectively: process 0 writes the metadata and commits; replicated arrays are
  # written in parallel by their replicas, so process 1 adds its share (ocdbt.process_1).
  state_dir = workdir / 'checkpoints' / str(NUM_STEPS) / 'state'
  print('checkpoint state folder:', sorted(os.listdir(state_dir)))
