"""host_memory: the environment a process re-executes with, and the re-execution itself."""

import os
import subprocess
import sys

import pytest

from diffhand_jax import host_memory


@pytest.mark.parametrize(
    'tunables,want',
    [
        (None, 'glibc.malloc.hugetlb=1'),
        ('', 'glibc.malloc.hugetlb=1'),
        ('glibc.malloc.arena_max=2', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),
    ],
)
def test_appends_the_tunable_to_what_is_there(tunables, want):
  environ = {'PATH': '/bin', 'DIFFHAND_HUGE_PAGES': '1'}
  if tunables is not None:
    environ['GLIBC_TUNABLES'] = tunables
  got = host_memory.environment_with_huge_pages(environ, 'linux')
  assert got == {'PATH': '/bin', 'DIFFHAND_HUGE_PAGES': '1', 'GLIBC_TUNABLES': want}
  assert 'GLIBC_TUNABLES' not in environ or environ['GLIBC_TUNABLES'] == tunables  # not mutated


@pytest.mark.parametrize(
    'environ,platform',
    [
        ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1', 'DIFFHAND_HUGE_PAGES': '1'}, 'linux'),  # done
        (
            {
                'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0',
                'DIFFHAND_HUGE_PAGES': '1',
            },
            'linux',
        ),  # the user's own value
        ({}, 'linux'),  # off by default: accelerator hosts, debuggers, notebooks
        ({'DIFFHAND_HUGE_PAGES': '0'}, 'linux'),
        ({'DIFFHAND_HUGE_PAGES': '1'}, 'darwin'),
        ({'DIFFHAND_HUGE_PAGES': '1'}, 'win32'),
    ],
)
def test_nothing_to_do(environ, platform):
  assert host_memory.environment_with_huge_pages(environ, platform) is None


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='re-executes on Linux only')
def test_reexecutes_once_with_the_same_arguments(tmp_path):
  script = tmp_path / 'entry.py'
  script.write_text(
      'import os, sys\n'
      'print("start", os.getpid(), flush=True)\n'
      'from diffhand_jax import host_memory\n'
      'host_memory.reexec_with_huge_pages()\n'
      'print("args", sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), os.getpid())\n'
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  environ = {
      k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'DIFFHAND_HUGE_PAGES')
  }
  environ['PYTHONPATH'] = root
  plain = subprocess.run(
      [sys.executable, '-u', str(script)], env=environ, capture_output=True, text=True, check=True
  ).stdout.split('\n')
  assert len([line for line in plain if line.startswith('start')]) == 1  # not asked: no re-exec
  environ['DIFFHAND_HUGE_PAGES'] = '1'
  out = subprocess.run(
      [sys.executable, '-u', str(script), 'a', '--b=c'],
      env=environ,
      capture_output=True,
      text=True,
      check=True,
  ).stdout.split('\n')
  starts = [line for line in out if line.startswith('start')]
  assert len(starts) == 2 and starts[0] == starts[1]  # twice, in the same process (exec)
  pid = starts[0].split()[1]
  assert out[2] == f"args ['a', '--b=c'] glibc.malloc.hugetlb=1 {pid}"
