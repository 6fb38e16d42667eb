"""distributed.setup's host-memory setting for CPU jobs: freed blocks over glibc's 32 MiB mmap
limit stay in the process for reuse (instead of being unmapped and faulted in again), unless the
user chose the allocator's settings. Each case runs in its own interpreter: the setting is
process-wide."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

PROBE = """
import sys, torch
from reproduce import distributed
applied = distributed.setup("cpu").device.type == "cpu" and distributed.reuse_freed_host_memory() if sys.argv[1] == "setup" else False
def resident(): return int(open("/proc/self/statm").read().split()[1]) * 4096
block = torch.ones(96 << 20, dtype=torch.uint8)  # 96 MiB, touched
held = resident()
del block
print(int(applied), (held - resident()) >> 20)
"""


def probe(mode: str, **env) -> tuple[bool, int]:
    """(setting in force, MiB given back to the kernel when a 96 MiB tensor is freed)."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    applied, returned = out.stdout.split()
    return applied == "1", int(returned)


def test_a_cpu_job_keeps_freed_blocks_for_reuse():
    applied, returned = probe("setup")
    assert applied and returned < 16, returned  # kept in the heap, ready for the next batch


def test_glibc_default_gives_large_blocks_back():
    applied, returned = probe("none")
    assert not applied and returned >= 80, returned  # what the setting avoids: unmapped, faulted in again next time


def test_the_users_own_malloc_settings_are_left_alone():
    applied, returned = probe("setup", MALLOC_TOP_PAD_="0")
    assert not applied and returned >= 80, returned
