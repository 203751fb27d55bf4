"""Peak memory of the benchmark's consumer scripts, read the way e2e.py reads ingest's."""

from __future__ import annotations


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM) in MB. Not ``ru_maxrss``: Linux keeps that across
    exec, so a child started by a large benchmark process inherits its parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")
