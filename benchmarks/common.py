"""Shared helpers for the scripts in benchmarks/: median wall time, one plain-text table, and a quiet profiler
(torch.profiler without kineto's start/stop lines on stderr).

Each benchmark compares against its baseline in the same process; these few helpers keep every
script's output in the same format. Deliberately no statistics beyond the median.
"""
import contextlib
import os
import re
import sys
import tempfile
import time


def median_ms(fn, warmup=3, runs=10):
    """Median wall time of fn() in milliseconds, after `warmup` untimed calls (caches, thread pools)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return _median(times)


def median_ms_interleaved(fns, warmup=3, runs=10):
    """{name: median ms} for a dict of callables timed in turn within each run, so that load from other
    processes on a shared machine hits every contender alike and the ratios stay fair."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _median(t) for name, t in times.items()}


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def status_kb(field):
    """A field of /proc/self/status in kB (Linux): VmRSS, the resident memory now; VmHWM, its peak so far."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def print_table(header, rows):
    """Print rows (lists of str/int/float) under header as an aligned, Markdown-compatible table."""
    def cell(value):
        return f"{value:.2f}" if isinstance(value, float) else str(value)
    table = [[cell(v) for v in header]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines), flush=True)


@contextlib.contextmanager
def without_kineto_start_stop_lines():
    """torch.profiler's C++ library (kineto) writes "USDT: ... profiler_start" and "... profiler_stop" to the process's
    stderr (file descriptor 2, below Python) each time a profile starts and stops. Its log level (KINETO_LOG_LEVEL)
    can hide those only together with kineto's errors, so stderr is caught while profiling and written back
    without exactly those two lines: every other message, Python's warnings included, still shows."""
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not re.match(r"USDT:.*\] profiler_(start|stop)\s*$", line):
                    sys.stderr.write(line)
