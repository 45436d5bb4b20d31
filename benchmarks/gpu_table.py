"""The accelerator benchmarks as one markdown table, each piece in a process with a time limit.

Runs the pieces of benchmarks/gpu_pieces.py one after the other, each in a fresh process (its
own device memory, killed with its children at its limit), and merges their rows into one
table, printed and written to <out>/gpu_table.md (the raw rows to <out>/gpu_table.json, each
piece's log to <out>/<piece>.log):

  - the bf16 matmul rate measured in this run (the MFU roofline) and its fraction of the given
    peak (--peak_tflops);
  - DeiT-Base and DeiT-Large train step (configs/freihand.py, 224 px, batch 64, bfloat16):
    ms/step, images/s, TFLOP/s, MFU against the measured matmul rate and the given peak,
    planned memory without / with remat, the largest batch that fits;
  - the same network's train step in PyTorch eager and torch.compile (bf16 autocast);
  - sampling, S = 10, K = 1 and K = 16, one image, for both models.

A piece's limit is its share of --budget_s plus what the pieces before it left unused; a row
that did not finish says why ('timeout (120 s) in ...', 'failed ...', 'not installed',
'skipped: no time left') instead of vanishing. The pieces run in order of importance: JAX train
steps, sampling, PyTorch eager, torch.compile. Imports no JAX itself (no device memory held).

With --toy every model is a ViT-micro at 32 px, batch 2, 2 x 2 steps: the whole table on a
CPU in a minute or two, to check the plumbing (tests/test_gpu_benchmarks.py).

Usage:
  bash benchmarks/gpu_benchmarks.sh [out_dir]                    # the GPU run, < 10 minutes
  python benchmarks/gpu_table.py --out=runs/gpu_benchmarks --peak_tflops=989
  .venv/bin/python benchmarks/gpu_table.py --toy --out=/tmp/gpu_toy
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIECES_SCRIPT = os.path.join(ROOT, 'benchmarks', 'gpu_pieces.py')

# The table's rows in order: key, workload, framework.
ROWS = (
    ('matmul', 'bf16 matmul N x N x N (roofline)', 'JAX'),
    ('train_base', 'DeiT-Base train step', 'JAX (full DiffHand step)'),
    ('torch_eager_base', 'DeiT-Base train step', 'PyTorch eager (L2 loss)'),
    ('torch_compile_base', 'DeiT-Base train step', 'torch.compile (L2 loss)'),
    ('train_large', 'DeiT-Large train step', 'JAX (full DiffHand step)'),
    ('torch_eager_large', 'DeiT-Large train step', 'PyTorch eager (L2 loss)'),
    ('torch_compile_large', 'DeiT-Large train step', 'torch.compile (L2 loss)'),
    ('sample_base_k1', 'DeiT-Base sample S=10 K=1', 'JAX'),
    ('sample_base_k16', 'DeiT-Base sample S=10 K=16', 'JAX'),
    ('sample_large_k1', 'DeiT-Large sample S=10 K=1', 'JAX'),
    ('sample_large_k16', 'DeiT-Large sample S=10 K=16', 'JAX'),
)
COLUMNS = (
    'workload', 'framework', 'batch', 'ms (median, min-max)', 'images/s', 'TFLOP/s',
    'MFU vs matmul', 'MFU vs peak', 'planned GiB: no remat / remat', 'largest batch',
    'compile / first call s', 'status',
)  # fmt: skip
TEXT_COLUMNS = ('workload', 'framework', 'largest batch', 'status')
# Statuses a piece leaves on a row it has finished with.
FINAL = ('ok', 'not installed', 'failed')
MIN_PIECE_S = 10.0  # a piece with less time left than this is skipped


@dataclasses.dataclass
class Piece:
  """One process of gpu_pieces.py: its arguments, the rows it fills, its share of the time."""

  name: str
  args: tuple
  rows: tuple
  budget_s: float
  env: dict = dataclasses.field(default_factory=dict)
  needs_torch: bool = False


def pieces() -> list:
  """The pieces in the order they run (most important first), with their GPU time shares (s)."""
  train_env = {'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.95'}  # the largest batch may use the GPU
  torch_env = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}  # JAX only builds the weights there
  out = [Piece('matmul', ('--piece=matmul',), ('matmul',), 20)]
  out += [
      Piece(f'train_{m}', ('--piece=train', f'--model={m}'), (f'train_{m}',), s, train_env)
      for m, s in (('base', 110), ('large', 160))
  ]
  for model, share in (('base', 30), ('large', 35)):
    keys = (f'sample_{model}_k1', f'sample_{model}_k16')
    out.append(Piece(f'sample_{model}', ('--piece=sample', f'--model={model}'), keys, share))
  for framework, shares in (('eager', (45, 45)), ('compile', (70, 45))):
    for model, share in zip(('base', 'large'), shares):
      name = f'torch_{framework}_{model}'
      args = ('--piece=torch', f'--model={model}', f'--framework={framework}')
      out.append(Piece(name, args, (name,), share, torch_env, needs_torch=True))
  return out


def timing(args) -> tuple:
  """(train steps per repeat, repeats of the JAX pieces, calls of the PyTorch pieces)."""
  return (2, 2, 2) if args.toy else (10, 5, 10)


def piece_command(piece: Piece, args, result: str, deadline: float) -> list:
  """The command line of `piece`, writing its rows to `result`."""
  command = [args.python, PIECES_SCRIPT, *piece.args, f'--result={result}']
  command += [f'--peak_tflops={args.peak_tflops}', f'--deadline={deadline:.1f}']
  command += [f'--matmul_json={os.path.join(args.out, "matmul.json")}']
  steps, repeats, torch_repeats = timing(args)
  command += [f'--steps={steps}', f'--repeats={torch_repeats if piece.needs_torch else repeats}']
  if args.toy:
    command += ['--toy']
    if piece.args[0] == '--piece=train':  # a pretend device limit; the fit is run at 2 x 2
      command += [f'--memory_limit_gib={args.toy_memory_gib}', '--max_fit_batch=4']
  return command


def run_process(command: list, limit_s: float, log_path: str, env: dict) -> str:
  """Runs `command` (its own process group, output to `log_path`) for at most `limit_s`.

  Returns:
    'ok', 'timeout' (the group was killed at the limit) or 'failed (exit N): <last error>'.
  """
  with open(log_path, 'w') as log:
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
    )
    try:
      code = process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
      return 'timeout'
  return 'ok' if code == 0 else f'failed (exit {code}): {last_error(log_path)}'


def last_error(log_path: str) -> str:
  """The last line of the log that names an error (or its last line), shortened."""
  with open(log_path, errors='replace') as f:
    lines = [line.strip() for line in f if line.strip()]
  errors = [line for line in lines if re.search(r'Error|Exception|error:', line)]
  text = (errors or lines or ['no output'])[-1]
  return text[:120]


def piece_env(piece: Piece, args) -> dict:
  """The environment of `piece`: ours + its own; in toy mode a shared compilation cache (the
  toy models are the same network: later pieces reuse the first one's compiles)."""
  env = dict(os.environ, PYTHONUNBUFFERED='1', **piece.env)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, (ROOT, env.get('PYTHONPATH'))))
  if args.toy:
    env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(args.out, 'xla_cache')
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    # No LLVM optimisation: ~1.6x faster CPU compiles, the same buffers (planned memory).
    flags = (env.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
    env['XLA_FLAGS'] = flags
  return env


def read_rows(result: str) -> dict:
  """{'rows': ..., 'meta': ...} a piece wrote (empty if it wrote nothing readable)."""
  try:
    with open(result) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {'rows': {}, 'meta': {}}


def close_rows(piece: Piece, written: dict, outcome: str, limit_s: float) -> dict:
  """`piece`'s rows with a status for each: what it wrote, or why it has none."""
  rows = {}
  for key in piece.rows:
    row = dict(written.get(key, {}))
    status = row.get('status', '')
    if not status.startswith(FINAL):
      stage = status.partition(': ')[2] if status.startswith('running') else ''
      reason = f'timeout ({limit_s:.0f} s)' if outcome == 'timeout' else outcome
      if outcome == 'ok':
        reason = 'failed: the piece ended without this row'
      row['status'] = f'{reason} in {stage}' if stage else reason
    rows[key] = row
  return rows


def run_piece(piece: Piece, args, limit: float) -> tuple:
  """Runs `piece` for at most `limit` seconds; returns (its rows, each with a status, meta)."""
  result = os.path.join(args.out, f'{piece.name}.json')
  if os.path.exists(result):
    os.remove(result)
  began = time.time()
  print(f'=== {piece.name} (limit {limit:.0f} s) ===', flush=True)
  command = piece_command(piece, args, result, began + limit)
  log = os.path.join(args.out, f'{piece.name}.log')
  outcome = run_process(command, limit, log, piece_env(piece, args))
  print(f'    {outcome} after {time.time() - began:.0f} s', flush=True)
  written = read_rows(result)
  return close_rows(piece, written.get('rows', {}), outcome, limit), written.get('meta', {})


def run_all(args) -> tuple:
  """Runs every piece in its time limit, the table saved after each; returns (rows, meta)."""
  os.makedirs(args.out, exist_ok=True)
  shutil.rmtree(os.path.join(args.out, 'xla_cache'), ignore_errors=True)  # toy: a cold start
  plan = pieces()
  scale = args.budget_s / sum(p.budget_s for p in plan)
  has_torch = importlib.util.find_spec('torch') is not None
  start = time.time()
  rows, meta, bank = {}, {}, 0.0
  for piece in plan:
    share = piece.budget_s * scale
    limit = min(share + bank, start + args.budget_s - time.time())
    began = time.time()
    if piece.needs_torch and not has_torch:
      rows.update({key: {'status': 'not installed'} for key in piece.rows})
    elif limit < MIN_PIECE_S:
      rows.update({key: {'status': 'skipped: no time left'} for key in piece.rows})
    else:
      piece_rows, piece_meta = run_piece(piece, args, limit)
      rows.update(piece_rows)
      meta.update(piece_meta)
    bank = max(0.0, share + bank - (time.time() - began))
    meta['total_s'] = time.time() - start
    save(rows, meta, args)
  return rows, meta


# ---- The table ----


def number(value) -> str:
  """A number to about three significant figures (thousands separated)."""
  value = float(value)
  if not math.isfinite(value):
    return str(value)
  if abs(value) >= 100:
    return f'{value:,.0f}'
  return f'{value:.3g}'


def percent(value) -> str:
  return f'{number(100 * float(value))} %'


def cells(row: dict) -> dict:
  """The table cells of a row's fields ('-' where a field is absent)."""
  get = lambda name, fmt=number: fmt(row[name]) if name in row else '-'
  ms = get('ms')
  if 'ms_min' in row:
    ms = f'{ms} ({number(row["ms_min"])}-{number(row["ms_max"])})'
  memory = '-'
  if 'memory_gib' in row:
    memory = f'{number(row["memory_gib"])} / {get("memory_remat_gib")}'
  return {
      'batch': str(row.get('batch', '-')),
      'ms (median, min-max)': ms,
      'images/s': get('images_per_s'),
      'TFLOP/s': get('tflops'),
      'MFU vs matmul': get('mfu_matmul', percent),
      'MFU vs peak': get('mfu_peak', percent),
      'planned GiB: no remat / remat': memory,
      'largest batch': str(row.get('largest_batch', '-')),
      'compile / first call s': str(row.get('first_s', '-')),
      'status': str(row.get('status', '-')).replace('|', '/'),
  }


def table_lines(rows: dict) -> list:
  """The markdown table: one line per entry of ROWS."""
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  for key, workload, framework in ROWS:
    row = dict(cells(rows.get(key, {'status': 'not run'})), workload=workload, framework=framework)
    lines.append('| ' + ' | '.join(row[c] for c in COLUMNS) + ' |')
  return lines


def speedup(rows: dict, model: str) -> str:
  """Our train step's images/s over torch.compile's, as text ('-' without both)."""
  ours, theirs = rows.get(f'train_{model}', {}), rows.get(f'torch_compile_{model}', {})
  if 'images_per_s' not in ours or 'images_per_s' not in theirs:
    return '-'
  return f'{ours["images_per_s"] / theirs["images_per_s"]:.2f}x'


def report(rows: dict, meta: dict, args) -> str:
  """The markdown: a header line, the table, the targets and how the numbers were taken."""
  when = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M')
  machine = ', '.join(
      f'{k} {meta[k]}' for k in ('device', 'host', 'jax', 'torch') if k in meta
  )  # fmt: skip
  matmul = rows.get('matmul', {})
  header = (
      f'{when} UTC, {machine}; memory limit {number(meta.get("memory_limit_gib", 0))} GiB; '
      f'bf16 matmul at N = {matmul.get("batch", "-")} measured in this run: '
      f'{number(matmul["tflops"]) if "tflops" in matmul else "-"} TFLOP/s; '
      f'given peak {number(args.peak_tflops)} TFLOP/s; all {meta.get("total_s", 0):.0f} s.'
  )
  if args.toy:
    header += (
        ' TOY MODE: every model is a ViT-micro at 32 px, batch 2, the memory limit pretend '
        '(the plumbing, not a measurement).'
    )
  mfu_large = rows.get('train_large', {}).get('mfu_matmul')
  steps, repeats, torch_repeats = timing(args)
  notes = [
      f'- Targets: DeiT-Large MFU vs matmul '
      f'{percent(mfu_large) if mfu_large is not None else "-"} (target >= 45 %); train step '
      f'vs torch.compile (images/s): DeiT-Base {speedup(rows, "base")}, DeiT-Large '
      f'{speedup(rows, "large")} (target >= 1.2x).',
      '- JAX train rows: the full DiffHand step (DESIGN §5 losses, AdamW, clipping, EMA) of '
      f'configs/freihand.py with cpu_kernels off, median (min-max) of {repeats} x {steps} '
      "steps; FLOPs from XLA's cost analysis of the lowered step; MFU vs matmul = TFLOP/s over "
      'the matmul row. Compile s = lower + XLA compile, beside the two compiles that plan '
      'memory (remat on; twice the batch; both without GEMM autotuning). Planned memory = '
      'arguments + outputs + temporaries - donated. Largest batch: without remat, under 95 % '
      "of the memory limit, linear in the batch from B and 2B; 'ran' = one step ran there, "
      "'planned' = no time left to run it.",
      '- PyTorch rows (benchmarks/torch_reference.py): the same network, forward + L2 loss + '
      'backward + Adam under bf16 autocast (less work than our full step); median (min-max) '
      f'of {torch_repeats} calls after the first (first call s: compilation included). '
      f'Sampling: `sampling.sample`, one image, median (min-max) of {repeats} calls after the '
      'first. Each piece: a process with a time limit.',
  ]
  return '\n'.join([header, '', *table_lines(rows), '', *notes]) + '\n'


def parse_table(text: str) -> dict:
  """{row key: {column: cell}} of the table in a report (the inverse of `table_lines`)."""
  lines = [line for line in text.splitlines() if line.startswith('|')]
  header = [c.strip() for c in lines[0].strip('|').split('|')]
  labels = {(workload, framework): key for key, workload, framework in ROWS}
  rows = {}
  for line in lines[2:]:
    row = dict(zip(header, (c.strip() for c in line.strip('|').split('|'))))
    rows[labels[(row['workload'], row['framework'])]] = row
  return rows


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='runs/gpu_benchmarks')
  parser.add_argument('--toy', action='store_true', help='toy sizes: the plumbing on a CPU')
  parser.add_argument('--peak_tflops', type=float, default=0.0, help='0: 989 (1 with --toy)')
  parser.add_argument(
      '--budget_s', type=float, default=0.0, help='0: 540 (--toy: 1200, for a loaded CPU)'
  )
  parser.add_argument('--python', default=sys.executable, help='runs the pieces')
  parser.add_argument(
      '--toy_memory_gib', type=float, default=1.0, help='the pretend device limit of --toy'
  )
  args = parser.parse_args(argv)
  args.peak_tflops = args.peak_tflops or (1.0 if args.toy else 989.0)
  args.budget_s = args.budget_s or (1200.0 if args.toy else 540.0)
  return args


def save(rows: dict, meta: dict, args) -> str:
  """Writes the report (rows not yet run: 'not run') and the raw rows to args.out."""
  text = report(rows, meta, args)
  with open(os.path.join(args.out, 'gpu_table.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(args.out, 'gpu_table.json'), 'w') as f:
    json.dump({'rows': rows, 'meta': meta}, f, indent=1)
  return text


def main(argv=None):
  args = parse_args(argv)
  rows, meta = run_all(args)
  print('\n' + save(rows, meta, args))


if __name__ == '__main__':
  main()
