"""Shared child side of bench/dp.py: time one query, first run and repeats, and report it as JSON lines on stdout.

Every measurement in bench/dp.py runs in a fresh process (this module's caller), so the peak resident
memory read here (VmHWM) belongs to that one system alone. It must import only the standard library:
it runs inside the peers' own virtualenvs too.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

Answer = list[tuple[str, float, float]]


def memory_mib(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process, in MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # Without /proc only the peak is known; ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Start VmHWM again from the current RSS (Linux >= 4.0), so the timed runs get a peak of their own."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def versions(*packages: str) -> dict[str, str]:
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def emit(event: str, **fields: Any) -> None:
    # One JSON object a line; the parent ignores anything else a library prints to stdout.
    print(json.dumps({"event": event, **fields}), flush=True)


def unavailable(reason: str) -> None:
    """Tell the parent this system cannot be measured here, and why."""
    emit("unavailable", reason=reason)


def measure(run: Callable[[], Answer], *, repeats: int, packages: Sequence[str]) -> None:
    """A first run, timed apart and reported at once (the parent may give up on a slow peer), then the repeats."""
    baseline = memory_mib("VmRSS")
    started = time.perf_counter()
    answer = run()
    warmup = time.perf_counter() - started
    emit("warmup", seconds=warmup)
    # The first run may build something once per process (the engine ranks rows within units for bounding),
    # so its peak is kept and the repeats' own peak is read apart from it.
    first_peak = memory_mib("VmHWM")
    separate = reset_peak()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        answer = run()
        times.append(time.perf_counter() - started)
    timed_peak = memory_mib("VmHWM") if separate else None
    emit("result", warmup_s=warmup, times_s=times, peak_rss_mib=max(first_peak, timed_peak or 0.0),
         timed_peak_rss_mib=timed_peak, baseline_rss_mib=baseline, versions=versions(*packages),
         answer=sorted(answer), python=sys.version.split()[0])
