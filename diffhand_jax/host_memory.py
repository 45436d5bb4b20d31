"""Transparent huge pages for XLA CPU's per-call buffers, through glibc's malloc tunable.

XLA CPU allocates each execution's temporary buffer with malloc (786 MB for the synthetic
train step at batch 32). A block that size is mapped fresh from the kernel by every call and
unmapped after it, so every call page-faults on each 4 KiB it touches: ~193,000 faults per
train step on the 2-core CPU. glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) makes
malloc advise transparent huge pages on such maps (madvise MADV_HUGEPAGE, which the kernel's
default THP mode `madvise` honours), and the same buffer then faults in 2 MiB pieces (~960
faults per step): the step takes 0.80-0.95x the time on the 2-core CPU (the larger gain when
the VM is idle), with bit-identical losses (BENCHMARKS.md, issue 11). Where the tunable is
unknown (older glibc, musl) or THP is off, nothing changes.

A CPU tool, off unless asked for: glibc reads its tunables once, at process start, so an entry
point calls `reexec_with_huge_pages()` first thing, and with DIFFHAND_HUGE_PAGES=1 in the
environment (`launch.py --huge_pages` sets it; `make demo` and `make bench` pass it) the process
re-executes itself once (same PID, same arguments) with the tunable added to GLIBC_TUNABLES.
Without it nothing happens, so accelerator hosts, debuggers and notebooks that run an entry
point are never restarted.
"""

import os
import sys
from typing import Mapping, Optional

TUNABLE = 'glibc.malloc.hugetlb'
OPT_IN = 'DIFFHAND_HUGE_PAGES'  # '1' turns the re-execution on


def environment_with_huge_pages(
    environ: Mapping[str, str], platform: str = sys.platform
) -> Optional[dict]:
  """The environment to re-execute with, or None if there is nothing to do.

  None on other systems than Linux, unless DIFFHAND_HUGE_PAGES=1, and when GLIBC_TUNABLES
  already names the tunable (whatever its value: the user's choice, or the re-executed
  process itself). Otherwise a copy of `environ` whose GLIBC_TUNABLES has the tunable
  appended to the tunables already there (colon-separated, as glibc reads them).
  """
  if not platform.startswith('linux') or environ.get(OPT_IN, '').strip() != '1':
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if any(item.split('=', 1)[0] == TUNABLE for item in tunables.split(':')):
    return None
  return {
      **environ,
      'GLIBC_TUNABLES': ':'.join(item for item in (tunables, f'{TUNABLE}=1') if item),
  }


def reexec_with_huge_pages() -> None:
  """Re-executes this Python process with `environment_with_huge_pages`, if it says to.

  Call it before any work: the process image is replaced (sys.orig_argv: the same
  interpreter options, script or -m module, and arguments).
  """
  environ = environment_with_huge_pages(os.environ)
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
