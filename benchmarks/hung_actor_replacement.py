"""A hung actor's replacement: Ray's default kill timeout against odpo's (orchestrator/cluster.py).

An actor holding the only CPU is stopped (SIGSTOP, as a hung actor never answers) and killed with
`ray.kill(no_restart=True)`, as a pool replaces one; the seconds until a new actor on that CPU answers are
timed. A raylet waits `kill_worker_timeout_milliseconds` for a killed worker to exit before forcing it out, and
the hung one never exits by itself. A healthy actor, killed the same way, shows what the shorter wait costs one
that does exit. Each row's cluster is a fresh local one (the setting is a cluster's), the two settings
alternated, medians of `--repeats`.

    .venv/bin/python benchmarks/hung_actor_replacement.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

ONE_CLUSTER = """
import os, signal, sys, time, ray
timeout = int(sys.argv[1])
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _system_config=(
    {"kill_worker_timeout_milliseconds": timeout} if timeout else None))

@ray.remote(num_cpus=1)
class Holder:
    def pid(self):
        return os.getpid()

out = []
for hung in (False, True):
    a = Holder.remote()
    pid = ray.get(a.pid.remote())
    if hung:
        os.kill(pid, signal.SIGSTOP)
    start = time.perf_counter()
    ray.kill(a, no_restart=True)
    b = Holder.remote()
    ray.get(b.pid.remote())
    out.append(time.perf_counter() - start)
    ray.kill(b, no_restart=True)
    time.sleep(1)
print(*out)
"""


def main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from orchestrator.cluster import KILL_WORKER_TIMEOUT_MS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_kill_worker_timeout_milliseconds")}
    settings = {"Ray's default (5000 ms)": 0, f"odpo's ({KILL_WORKER_TIMEOUT_MS} ms)": KILL_WORKER_TIMEOUT_MS}
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    for k in range(args.repeats):
        for name, timeout in settings.items():
            done = subprocess.run([sys.executable, "-c", ONE_CLUSTER, str(timeout)], env=env, capture_output=True,
                                  text=True, timeout=300)
            if done.returncode != 0:
                raise SystemExit(f"{name}: {done.stderr[-2000:]}")
            healthy, hung = map(float, done.stdout.split()[-2:])
            seconds[name].append((healthy, hung))
            print(f"repeat {k + 1} {name}: healthy {healthy:.2f} s, hung {hung:.2f} s", flush=True)
    medians = {name: [statistics.median(s[i] for s in rows) for i in (0, 1)] for name, rows in seconds.items()}
    (d_name, d), (o_name, o) = medians.items()
    print(f"\nkilled actor -> its replacement answering (medians of {args.repeats}):")
    print(f"  healthy: {d_name} {d[0]:.2f} s, {o_name} {o[0]:.2f} s, ratio {o[0] / d[0]:.2f}")
    print(f"  hung:    {d_name} {d[1]:.2f} s, {o_name} {o[1]:.2f} s, ratio {o[1] / d[1]:.2f}")


if __name__ == "__main__":
    main()
