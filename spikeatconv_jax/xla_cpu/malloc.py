"""Run the entry points under tcmalloc when it is installed.

XLA:CPU allocates each execution's temporaries (gigabytes for a 224 px train step) afresh. glibc
malloc serves every block of 32 MiB or more with its own mmap and unmaps it on free, so each
step page-faults and zeroes all of that memory again. tcmalloc keeps freed memory mapped for
reuse, which makes CPU train steps markedly faster. Google's TPU VM images preload tcmalloc for
the same reason.

XLA:TPU's compiler (scripts/compile_tpu.py) spends about a fifth of a compile in glibc's malloc,
free and page faults; under tcmalloc tiny's train step compiles about a tenth faster.

`reexec_with_tcmalloc()` is called first thing by train.py, eval.py, the benchmarks and
scripts/compile_tpu.py: when
tcmalloc is installed (Debian: libtcmalloc-minimal4, which `make train`/`make test` install) and
not yet loaded, it re-executes the same command line with tcmalloc in LD_PRELOAD (same process
id, so launchers and signals are unaffected). SPIKEATCONV_TCMALLOC=0 turns this off.
"""

from __future__ import annotations

import glob
import os
import sys

ENV_SWITCH = "SPIKEATCONV_TCMALLOC"
_ENV_TRIED = "SPIKEATCONV_TCMALLOC_TRIED"  # set before the re-exec: never loop
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_tcmalloc() -> str | None:
  """Path of an installed tcmalloc shared library, or None."""
  for name in _NAMES:
    for d in _DIRS:
      hits = sorted(glob.glob(os.path.join(d, name)))
      if hits:
        return hits[0]
  return None


def in_use() -> str:
  """'tcmalloc' when a tcmalloc library is mapped into this process, else 'glibc'."""
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    maps = os.environ.get("LD_PRELOAD", "")
  return "tcmalloc" if "libtcmalloc" in maps else "glibc"


def reexec_with_tcmalloc() -> None:
  """Re-executes this command under tcmalloc when that helps (see the module docstring);
  otherwise returns and the caller goes on as it is."""
  if not sys.platform.startswith("linux") or os.environ.get(ENV_SWITCH, "1") == "0":
    return
  if os.environ.get(_ENV_TRIED) or in_use() == "tcmalloc":
    return
  path = find_tcmalloc()
  if path is None or not getattr(sys, "orig_argv", None):
    return
  env = dict(os.environ)
  env[_ENV_TRIED] = "1"
  env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
