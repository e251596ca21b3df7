"""Memory figures of this process for the benchmarks (``bench_data.py``, ``bench_mining.py``): one reader of
``/proc/self/status``."""

from __future__ import annotations

import resource
from typing import Dict


def proc_status(*fields: str) -> Dict[str, float]:
    """``fields`` of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` ...) in MiB; those
    missing (no /proc: not Linux) are left out."""
    out: Dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    out[key] = int(value.split()[0]) / 1024  # kB
    except OSError:
        pass
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far: VmHWM (ru_maxrss would carry the parent's peak from before
    fork+exec into a child), else ru_maxrss."""
    return proc_status("VmHWM").get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
