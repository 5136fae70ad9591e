"""core/memory: the one reader of this process's resident memory (benchmark probes, training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from senslora.core import memory

linux = pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="needs Linux /proc")


@linux
def test_rss_and_its_peak_see_a_new_allocation():
    # In a fresh process: in this one, freed heap could be reused without touching new pages.
    code = (
        "from senslora.core import memory\n"
        "before, peak_before = memory.rss_bytes(), memory.peak_rss_bytes()\n"
        "assert 0 < before <= peak_before, (before, peak_before)\n"
        "block = bytearray(64 * 2**20)\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "assert memory.rss_bytes() >= before + 48 * 2**20, (before, memory.rss_bytes())\n"
        "assert memory.peak_rss_bytes() >= before + 48 * 2**20, (before, memory.peak_rss_bytes())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@linux
def test_reset_peak_rss_never_raises_the_peak():
    # Whether the kernel honours /proc/self/clear_refs varies (sandboxes ignore it): only check
    # that the reset runs, says whether it could, and never raises the peak.
    code = (
        "from senslora.core import memory\n"
        "block = bytearray(96 * 2**20)\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "del block\n"
        "high = memory.peak_rss_bytes()\n"
        "assert memory.reset_peak_rss() in (True, False)\n"
        "assert memory.peak_rss_bytes() <= high\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_proc_means_zero(monkeypatch):
    def missing(self, *args, **kwargs):
        raise FileNotFoundError(self)

    monkeypatch.setattr(Path, "read_text", missing)
    assert memory.rss_bytes() == 0


def test_importing_it_does_not_import_torch():
    code = "import sys, senslora.core.memory; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
