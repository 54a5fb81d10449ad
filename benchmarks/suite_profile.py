"""Where the test suite's time goes: each test file's wall seconds and how busy the cores were meanwhile.

Runs pytest as `make test` does (`--workers 2`: two pytest-xdist workers, whole files each, in the order
tests/conftest.py sets; `--workers 0`: one process) with `-v` and the arguments given after `--` (`tests` by
default), and reads /proc/stat every 2 s beside it. A test's seconds run from its worker's previous result to
its own. A file's `busy` is the share of all cores working while its tests ran (1.0: every core, all the
time; with two workers, the other worker's file counts too); a low share is waiting (timeouts, sleeps, one
process working alone). Linux only.

Time a suite on a clone with its own `.venv` (`make install` there, as CI does): a clone that links another
checkout's `.venv` sees DeepSpeed's sources under two paths and rebuilds its CPU op several times a suite.

    git clone . /tmp/pc && cd /tmp/pc && make install && .venv/bin/python benchmarks/suite_profile.py
    .venv/bin/python benchmarks/suite_profile.py --workers 0 --top 20 -- tests/test_chaos.py
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict

RESULT = re.compile(r"^(tests/\S+?)::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
XDIST_RESULT = re.compile(r"^\[(gw\d+)\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ((tests/\S+?)::\S+)")
"""pytest -v's result line, alone and under pytest-xdist (`[gw0] [ 12%] PASSED tests/...::test_x`)."""


def cpu_counters() -> tuple[int, int]:
    """(busy, total) jiffies over all cores since boot; idle and iowait are not busy."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


class Sampler(threading.Thread):
    def __init__(self, interval_s: float = 2.0):
        super().__init__(daemon=True)
        self.interval_s, self.samples, self.done = interval_s, [], threading.Event()

    def run(self) -> None:
        busy0, total0 = cpu_counters()
        while not self.done.wait(self.interval_s):
            busy1, total1 = cpu_counters()
            self.samples.append((time.monotonic(), (busy1 - busy0) / max(1, total1 - total0)))
            busy0, total0 = busy1, total1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=10, help="the slowest tests to list")
    ap.add_argument("--workers", type=int, default=2, help="pytest-xdist workers, as `make test` (0: one process)")
    ap.add_argument("pytest_args", nargs="*", default=["tests"])
    args = ap.parse_args()
    sampler = Sampler()
    sampler.start()
    start = time.monotonic()
    last: dict[str, float] = defaultdict(lambda: start)  # each worker's previous result
    tests: list[tuple[str, str, float, float]] = []  # file, test, from, to
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-n", str(args.workers), *args.pytest_args],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        sys.stdout.write(line)
        m, x = RESULT.match(line), XDIST_RESULT.match(line)
        if m or x:
            worker, file, name = (x.group(1), x.group(4), x.group(3)) if x else ("", m.group(1), line.split(" ")[0])
            now = time.monotonic()
            tests.append((file, name, last[worker], now))
            last[worker] = now
    proc.wait()
    sampler.done.set()
    sampler.join()

    def busy(a: float, b: float) -> float | None:
        inside = [x for t, x in sampler.samples if a < t <= b]
        return sum(inside) / len(inside) if inside else None

    wall = time.monotonic() - start
    overall = busy(start, start + wall)
    print(f"\nsuite: {wall:.0f} s, cores busy {overall:.2f} of the time (exit {proc.returncode})")
    files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for file, _, a, b in tests:
        share = busy(a, b)
        files[file][0] += b - a
        files[file][1] += (b - a) * (share if share is not None else 0.0)
    print(f"{'seconds':>8} {'busy':>5}  file")
    for file, (seconds, weighted) in sorted(files.items(), key=lambda kv: -kv[1][0]):
        if seconds >= 1:
            print(f"{seconds:8.0f} {weighted / seconds:5.2f}  {file}")
    print(f"\nthe {args.top} slowest tests:")
    for _, name, a, b in sorted(tests, key=lambda t: t[2] - t[3])[:args.top]:
        share = busy(a, b)
        print(f"{b - a:8.1f} {share if share is not None else float('nan'):5.2f}  {name}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
