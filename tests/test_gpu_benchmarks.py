"""benchmarks/gpu_benchmarks.sh: one table with every row, numbers or the reason there are none.

The end-to-end test runs the script's toy mode on the CPU (ViT-micro, 32 px, batch 2: about a
minute or two on 2 cores); the others check the pieces that a CPU cannot reach on its own:
timeouts, failures, the largest-batch fit, the standard path off the CPU, the PyTorch rows.
"""

import json
import math
import os
import re
import subprocess
import sys
import types

import jax
import pytest

import benchmarks
from benchmarks import gpu_pieces
from benchmarks import gpu_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = gpu_table.importlib.util.find_spec('torch') is not None
NUMERIC = (
    'batch', 'ms (median, min-max)', 'images/s', 'TFLOP/s', 'MFU vs matmul', 'MFU vs peak',
    'planned GiB: no remat / remat', 'compile / first call s',
)  # fmt: skip
# Cells every finished row of a kind must have.
REQUIRED = {
    'matmul': ('TFLOP/s', 'MFU vs peak'),
    'train': (
        'batch', 'ms (median, min-max)', 'images/s', 'TFLOP/s', 'MFU vs matmul', 'MFU vs peak',
        'planned GiB: no remat / remat', 'largest batch', 'compile / first call s',
    ),
    'torch': ('batch', 'ms (median, min-max)', 'images/s', 'compile / first call s'),
    'sample': ('batch', 'ms (median, min-max)', 'images/s', 'compile / first call s'),
}  # fmt: skip


def numbers(cell: str) -> list:
  """The numbers in a cell ('1,234.5 (1.2-3)' -> [1234.5, 1.2, 3.0]); 'nan'/'inf' included."""
  return [
      float(x) for x in re.findall(r'nan|inf|\d[\d,]*\.?\d*(?:e[-+]?\d+)?', cell.replace(',', ''))
  ]


def check_table(text: str, torch_installed: bool) -> dict:
  """Asserts the report's table has every row, each finished or saying why, with positive,
  finite numbers where it has any. Returns the parsed rows."""
  rows = gpu_table.parse_table(text)
  assert list(rows) == [key for key, _, _ in gpu_table.ROWS]
  for key, row in rows.items():
    kind = key.split('_')[0]
    status = row['status']
    if kind == 'torch' and not torch_installed:
      assert status == 'not installed', (key, status)
      continue
    if kind == 'torch' and 'compile' in key:  # needs a C++ compiler and may run out of time
      assert status == 'ok' or status.startswith(('failed', 'timeout')), (key, status)
    else:
      assert status == 'ok', (key, status)
    for column in NUMERIC:
      for value in numbers(row[column]):
        assert math.isfinite(value) and value > 0, (key, column, row[column])
    if status == 'ok':
      for column in REQUIRED[kind]:
        assert numbers(row[column]), (key, column, row[column])
  return rows


@pytest.mark.slow
def test_toy_mode_gives_every_row(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable)
  run = subprocess.run(
      ['bash', 'benchmarks/gpu_benchmarks.sh', '--toy', str(tmp_path)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=1500,
      check=False,
  )
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  text = (tmp_path / 'gpu_table.md').read_text()
  assert text in run.stdout  # printed as well as written
  assert 'TOY MODE' in text
  rows = check_table(text, HAS_TORCH)
  for model in ('base', 'large'):
    train = rows[f'train_{model}']
    assert train['batch'] == '2'
    assert re.fullmatch(r'\d+ \((ran|planned)\)', train['largest batch']), train
    assert len(numbers(train['planned GiB: no remat / remat'])) == 2
  raw = json.loads((tmp_path / 'gpu_table.json').read_text())
  assert raw['rows']['matmul']['tflops'] > 0
  assert raw['meta']['device'].endswith('(cpu)')


def _report(rows):
  args = gpu_table.parse_args(['--toy'])
  return gpu_table.report(rows, {'device': 'cpu (cpu)', 'total_s': 1.0}, args)


def _ok_rows():
  """A finished table's rows, as the pieces write them."""
  timing = dict(status='ok', batch=2, ms=10.0, ms_min=9.0, ms_max=11.0, images_per_s=200.0)
  rows = {'matmul': dict(status='ok', batch=256, ms=1.0, tflops=0.5, mfu_peak=0.5)}
  for key, _, _ in gpu_table.ROWS[1:]:
    rows[key] = dict(timing, first_s='1.5')
    if key.startswith('train'):
      rows[key].update(
          tflops=0.1, mfu_matmul=0.2, mfu_peak=0.1, memory_gib=1.5, memory_remat_gib=1.0,
          largest_batch='8 (ran)', first_s='0.5 + 2.0',
      )  # fmt: skip
  return rows


def test_check_fails_on_bad_or_missing_numbers():
  rows = _ok_rows()
  check_table(_report(rows), torch_installed=True)
  for broken in (
      dict(rows, train_large=dict(rows['train_large'], mfu_matmul=float('nan'))),
      dict(rows, sample_base_k16=dict(rows['sample_base_k16'], images_per_s=0.0)),
      dict(rows, train_base={k: v for k, v in rows['train_base'].items() if k != 'tflops'}),
      dict(rows, torch_eager_large=dict(status='not installed')),
  ):
    with pytest.raises(AssertionError):
      check_table(_report(broken), torch_installed=True)
  lines = _report(rows).splitlines()
  without_a_row = '\n'.join(line for line in lines if 'DeiT-Large sample S=10 K=1 ' not in line)
  with pytest.raises((AssertionError, KeyError)):
    check_table(without_a_row, torch_installed=True)


def test_unfinished_rows_say_why(tmp_path):
  log = str(tmp_path / 'piece.log')
  sleep = [sys.executable, '-c', 'import time; time.sleep(30)']
  assert gpu_table.run_process(sleep, 1.0, log, dict(os.environ)) == 'timeout'
  crash = [sys.executable, '-c', 'raise ValueError("no such model")']
  outcome = gpu_table.run_process(crash, 30.0, log, dict(os.environ))
  assert outcome.startswith('failed (exit 1)') and 'no such model' in outcome

  piece = gpu_table.Piece('sample_base', (), ('sample_base_k1', 'sample_base_k16'), 10)
  written = {'sample_base_k1': dict(status='ok', ms=3.0), 'sample_base_k16': {'status': 'running'}}
  rows = gpu_table.close_rows(piece, written, 'timeout', 42.0)
  assert rows['sample_base_k1'] == dict(status='ok', ms=3.0)
  assert rows['sample_base_k16']['status'] == 'timeout (42 s)'
  written = {'sample_base_k1': dict(status='running: time', ms=3.0)}
  rows = gpu_table.close_rows(piece, written, outcome, 42.0)
  assert rows['sample_base_k1']['status'] == f'{outcome} in time'
  assert rows['sample_base_k16']['status'] == outcome

  table = gpu_table.parse_table(_report(dict(rows, train_large={'status': 'timeout (170 s)'})))
  assert table['train_large']['status'] == 'timeout (170 s)'
  assert table['train_large']['ms (median, min-max)'] == '-'
  assert table['torch_eager_base']['status'] == 'not run'


FAKE_PIECE = """
import json, sys, time
args = dict(a[2:].split('=', 1) for a in sys.argv[1:] if '=' in a)
if args['piece'] == 'matmul':
  rows = {'matmul': {'status': 'ok', 'tflops': 2.0, 'batch': 8}}
else:
  rows = {'train_base': {'status': 'running: time', 'ms': 5.0}}
json.dump({'rows': rows, 'meta': {'device': 'fake (cpu)'}}, open(args['result'], 'w'))
time.sleep(0 if args['piece'] == 'matmul' else 60)
"""


def test_time_left_over_is_passed_on_and_every_row_stays(monkeypatch, tmp_path):
  script = tmp_path / 'fake_piece.py'
  script.write_text(FAKE_PIECE)
  monkeypatch.setattr(gpu_table, 'PIECES_SCRIPT', str(script))
  monkeypatch.setattr(gpu_table, 'MIN_PIECE_S', 0.5)
  plan = [
      gpu_table.Piece('matmul', ('--piece=matmul',), ('matmul',), 3.0),
      gpu_table.Piece('train_base', ('--piece=train',), ('train_base',), 1.0),
      gpu_table.Piece('train_large', ('--piece=train',), ('train_large',), 0.2),
  ]
  monkeypatch.setattr(gpu_table, 'pieces', lambda: plan)
  out = tmp_path / 'out'
  args = gpu_table.parse_args([f'--out={out}', '--budget_s=4.2'])
  start = gpu_table.time.time()
  rows, meta = gpu_table.run_all(args)
  assert gpu_table.time.time() - start < 10
  assert rows['matmul']['status'] == 'ok' and meta['device'] == 'fake (cpu)'
  # The matmul piece's unused ~2.5 s went to train_base (a 1 s share): killed after > 2 s.
  train = rows['train_base']
  assert re.fullmatch(r'timeout \((\d+) s\) in time', train['status']), train
  assert int(re.search(r'\d+', train['status']).group()) >= 2 and train['ms'] == 5.0
  assert rows['train_large']['status'] == 'skipped: no time left'
  table = gpu_table.parse_table((out / 'gpu_table.md').read_text())  # saved after each piece
  assert table['train_large']['status'] == 'skipped: no time left'
  assert table['sample_base_k1']['status'] == 'not run'
  assert table['train_base']['ms (median, min-max)'] == '5'


def test_largest_batch_fit():
  gib = 2**30
  # 2 GiB fixed + 0.125 GiB per example: 0.95 x 80 GiB holds (76 - 2) / 0.125 = 592.
  assert gpu_pieces.fitted_batch(10 * gib, 18 * gib, 64, 80 * gib) == 592
  assert gpu_pieces.fitted_batch(10 * gib, 18 * gib, 64, 3 * gib) == 6  # small: not rounded
  assert gpu_pieces.fitted_batch(10 * gib, 18 * gib, 64, 1 * gib) == 0
  assert gpu_pieces.round_batch(599) == 592 and gpu_pieces.round_batch(15) == 15


def test_standard_path_off_the_cpu(monkeypatch):
  get_config = gpu_pieces.freihand.get_config

  def with_cpu_kernels(arg=None):
    config = get_config(arg)
    config.model.cpu_kernels = True
    return config

  monkeypatch.setattr(gpu_pieces.freihand, 'get_config', with_cpu_kernels)
  assert gpu_pieces.bench_config('large', toy=True).model.cpu_kernels
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  config = gpu_pieces.bench_config('large', toy=True)
  assert not config.model.cpu_kernels
  assert config.model.dtype == 'bfloat16' and config.train.global_batch_size == 2
  large = gpu_pieces.bench_config('large', toy=False)
  assert (large.model.encoder, large.model.encoder_size) == ('deit', 'large')
  assert large.data.image_size == 224 and large.train.global_batch_size == 64
  assert not large.model.cpu_kernels


def test_torch_rows_from_the_reference(monkeypatch, tmp_path):
  """run_torch turns torch_reference's summary into a row (a stand-in for torch here)."""
  calls = []

  def benchmark_config(name, args, jax_device, torch_device, config=None):
    calls.append((name, args.frameworks, args.dtype, config.model.encoder_size))
    results = {'eager': (4.0, [0.2, 0.1, 0.3]), 'compile': 'failed: RuntimeError: no compiler'}
    return {'batch': 2, 'results': {'train': {args.frameworks: results[args.frameworks]}}}

  fake_torch = types.SimpleNamespace(
      __version__='0.0', device=lambda kind: types.SimpleNamespace(type=kind),
      cuda=types.SimpleNamespace(is_available=lambda: False),
  )  # fmt: skip
  reference = types.SimpleNamespace(benchmark_config=benchmark_config)
  monkeypatch.setitem(sys.modules, 'torch', fake_torch)
  monkeypatch.setitem(sys.modules, 'benchmarks.torch_reference', reference)
  monkeypatch.setattr(benchmarks, 'torch_reference', reference, raising=False)
  result = str(tmp_path / 'torch.json')
  written = gpu_pieces.Rows(result)
  for framework in ('eager', 'compile'):
    args = gpu_pieces.parse_args(
        ['--piece=torch', '--model=base', f'--framework={framework}', '--toy', f'--result={result}']
    )
    gpu_pieces.run_torch(args, written)
  rows = json.load(open(result))['rows']
  assert calls == [
      ('deit_base', 'eager', 'bfloat16', 'micro'),
      ('deit_base', 'compile', 'bfloat16', 'micro'),
  ]
  eager = rows['torch_eager_base']
  assert eager['status'] == 'ok' and eager['first_s'] == '4.0'
  assert eager['ms'] == pytest.approx(200.0) and eager['images_per_s'] == pytest.approx(10.0)
  assert rows['torch_compile_base']['status'] == 'failed: RuntimeError: no compiler'
