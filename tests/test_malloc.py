"""xla_cpu.malloc: when the entry points re-execute under tcmalloc, and that it loads."""

import os
import subprocess
import sys

import pytest

from spikeatconv_jax.xla_cpu import malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fake(monkeypatch):
  """A glibc process with a tcmalloc found at a fake path; execve recorded, not run."""
  calls = []
  monkeypatch.setattr(malloc, "in_use", lambda: "glibc")
  monkeypatch.setattr(malloc, "find_tcmalloc", lambda: "/opt/x/libtcmalloc_minimal.so.4")
  monkeypatch.setattr(malloc.os, "execve", lambda *a: calls.append(a))
  for k in (malloc.ENV_SWITCH, malloc._ENV_TRIED):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
  return calls


def test_reexec_preloads_tcmalloc_and_keeps_the_command(fake):
  malloc.reexec_with_tcmalloc()
  assert len(fake) == 1
  exe, argv, env = fake[0]
  assert exe == sys.executable and argv == list(sys.orig_argv)
  assert env["LD_PRELOAD"] == "/opt/x/libtcmalloc_minimal.so.4:/opt/other.so"
  assert env[malloc._ENV_TRIED] == "1"


@pytest.mark.parametrize("case", ["switch_off", "already_tried", "loaded", "not_installed"])
def test_no_reexec(fake, monkeypatch, case):
  if case == "switch_off":
    monkeypatch.setenv(malloc.ENV_SWITCH, "0")
  elif case == "already_tried":  # e.g. the preload failed: never loop
    monkeypatch.setenv(malloc._ENV_TRIED, "1")
  elif case == "loaded":
    monkeypatch.setattr(malloc, "in_use", lambda: "tcmalloc")
  else:
    monkeypatch.setattr(malloc, "find_tcmalloc", lambda: None)
  malloc.reexec_with_tcmalloc()
  assert fake == []


@pytest.mark.skipif(malloc.find_tcmalloc() is None, reason="tcmalloc is not installed")
@pytest.mark.parametrize("switch,want", [("1", "tcmalloc"), ("0", "glibc")])
def test_reexec_for_real(switch, want):
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", malloc._ENV_TRIED)}
  env[malloc.ENV_SWITCH] = switch
  code = (
    "from spikeatconv_jax.xla_cpu import malloc; malloc.reexec_with_tcmalloc(); "
    "print(malloc.in_use())"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == want
