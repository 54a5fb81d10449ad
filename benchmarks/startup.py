"""Start-up, side by side with another commit: the same `odpo run` under this tree and under REF, alternated.

Each run is a fresh `odpo run` process (its own Ray cluster, as a user's command starts one) of one round; its
`startup/*` figures (metrics.jsonl's first line) are read back. The other commit runs from a git worktree with
this environment (PYTHONPATH puts its code first, for the driver and every Ray worker it starts). Printed: every
run's start-up broken down, then per variant the median of each step and the ratio to REF's.

    .venv/bin/python benchmarks/startup.py configs/tiny.yaml --against 9944a86            # make run's job
    .venv/bin/python benchmarks/startup.py examples/plurals/task.yaml --against 9944a86   # make real's job

`total` counts everything from the driver's first step to the first round; `besides_rm` leaves out the
reward-model stage (the tiny default trains its reward model first; issue 24's targets are besides it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("total", "besides_rm", "before_ray", "ray", "models", "reward_model", "learners", "wandb", "initial_eval", "rest",
         "generators_build", "scorers_build")


def one_run(code: str, config: str, overrides: list[str], out: str, name: str) -> dict[str, float]:
    """One `odpo run` of `code`'s tree: started in it (`python -m` puts the working directory first on the path,
    ahead of this environment's editable install, and Ray's workers inherit the driver's), on its own copy of
    the config; the DeepSpeed op compiled once for this environment is shared."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH")) if p),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions")))
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", config, f"run.output_dir={out}", f"run.name={name}",
           "run.rounds=1", "metrics.wandb=false", *overrides]
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed under {code}:\n{done.stderr[-3000:]}")
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    steps = {k.removeprefix("startup/").removesuffix("_s"): v for k, v in first.items() if k.startswith("startup/")}
    steps["besides_rm"] = steps["total"] - steps.get("reward_model", 0.0)
    return steps


def machine() -> str:
    """The machine the figures were measured on: cores, CPU model, the vector and matrix flags that decide the
    policy's dtype and speed (docs/benchmarks.md names it beside every figure)."""
    from orchestrator.config import cpu_flags

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown CPU") if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return f"machine: {os.cpu_count()} cores, {model}, {' '.join(flags) or 'no AVX2'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--against", required=True, help="the git commit to compare with (run from a worktree)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="odpo-startup-")
    worktree = os.path.join(scratch, "against")
    added = subprocess.run(["git", "worktree", "add", "--detach", worktree, args.against], cwd=REPO,
                           capture_output=True, text=True)
    if added.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise SystemExit(f"--against {args.against}: {added.stderr.strip()}")
    variants = {f"against {args.against}": worktree, "this tree": REPO}
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    try:
        for variant, code in variants.items():  # each variant must import its own tree, not the editable install
            where = subprocess.run([sys.executable, "-c", "import actors.learner as m; print(m.__file__)"], cwd=code,
                                   env=dict(os.environ, PYTHONPATH=code), capture_output=True, text=True).stdout.strip()
            if not os.path.realpath(where).startswith(os.path.realpath(code) + os.sep):
                raise SystemExit(f"{variant}: imports {where or 'nothing'}, not its tree {code}")
        print(machine())
        print(f"{'run':<24}" + "".join(f"{s:>17}" for s in STEPS))
        for k in range(args.repeats):
            for i, (variant, code) in enumerate(variants.items()):  # alternated: a slow minute hits both
                steps = one_run(code, args.config, args.overrides, scratch, f"variant{i}-run{k}")
                results[variant].append(steps)
                print(f"{variant + f' #{k}':<24}" + "".join(f"{steps.get(s, 0.0):>17.1f}" for s in STEPS), flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=REPO, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nmedians of {args.repeats} runs each ({args.config} {' '.join(args.overrides)}):")
    print(f"{'variant':<24}" + "".join(f"{s:>17}" for s in STEPS))
    medians = {v: {s: statistics.median(r.get(s, 0.0) for r in runs) for s in STEPS} for v, runs in results.items()}
    for variant, m in medians.items():
        print(f"{variant:<24}" + "".join(f"{m[s]:>17.1f}" for s in STEPS))
    base, new = medians[f"against {args.against}"], medians["this tree"]
    print(f"{'this tree / against':<24}" + "".join(f"{new[s] / base[s]:>17.2f}" if base[s] > 0.05 else f"{'-':>17}"
                                                   for s in STEPS))


if __name__ == "__main__":
    main()
