"""Resident memory of this process on the CPU: the one reader behind the benchmark's cost probes
(:mod:`senslora.bench.profiling`) and training's peak-memory figures (:mod:`senslora.training.train`).

* :func:`rss_bytes`: the resident set size now (Linux ``/proc/self/statm``; 0 where there is none).
* :func:`peak_rss_bytes`: the peak resident set size (``getrusage`` ``ru_maxrss``, which Linux
  reports in KiB and macOS in bytes; 0 without the ``resource`` module, i.e. on Windows).
* :func:`reset_peak_rss`: return freed heap to the OS (glibc ``malloc_trim``) and reset the peak
  (Linux ``/proc/self/clear_refs``), so that a later peak measures only what follows.

Plain standard library: importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (Linux ``/proc``; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes since it started or since the last
    :func:`reset_peak_rss` (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Collect garbage, hand freed heap back to the OS and reset the peak resident set size.

    Returns whether the peak could be reset (Linux only); where it cannot, :func:`peak_rss_bytes`
    keeps counting from the start of the process."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS
    except OSError:
        return False
    return True
