"""Driver soak (issue #15): the driver's own CPU seconds and resident memory per round stay flat over a long
run, with rollout pools at the most actors this machine holds.

Every committed round's line in metrics.jsonl carries `driver/cpu_s` (the driver process's CPU seconds, all
its threads, since the previous commit) and `driver/rss_mb` (its resident memory at the commit). This runs the
real driver, `orchestrator.driver.run`, on a local Ray cluster it starts itself (one placement group per
generator actor, `generator.cpus_per_actor` logical CPUs each), and reads those figures back:

    --real     transformers engines of the tiny built-in policy, as many as this machine's memory holds:
               one engine is started first and its unique memory (USS, after a generation) divided into
               what is available less --reserve-gb (8 GiB: the other pools, the driver, Ray, other work);
               15 rounds
    (default)  64 stand-in engines, 50 rounds. The stand-in is benchmarks/rollout_scaling.py's
               `SleepGenerator` (a fixed sleep per chunk, n responses per prompt with distinct rewards), built
               with an engine's constructor arguments; it stands in for hardware we don't have (64 engines on
               a 2-core machine). It replaces the engine class in this process only
               (`orchestrator.cluster.generator_class`), so the pool is built, placed and synced as always.
               Before going to 64 the same memory check runs; when 64 do not fit, the most that fit are used.

Everything else is real: the function scorer pool, the tiny DeepSpeed learner, the driver loop (streaming,
the weight sync to every generator, checkpoints, metrics). Each round has the same work: 2 chunks of 2 prompts
per generator (prompts_per_round = 4 x actors), from configs/data/tiny_prompts.jsonl repeated until every
round has fresh rows. Rounds 0 and 1 (warm-up) are left out: round 1's line also carries the drawing of
plots/rounds.png after round 0 (matplotlib's import and first figure: 0.6-1.5 s of CPU here), because
`commit` takes the driver's figures before it draws. The rest are compared within the one run, the first five rounds' means
against the last five's and a least-squares line through all of them, so the machine's other load moves both
ends alike (no wall-clock thresholds). Exits 1 when growth is clear: the fitted RSS slope
adds more than 10% of the mean RSS over 50 rounds, or the last five rounds' CPU is over 1.5x the first five's.

    .venv/bin/python benchmarks/driver_soak.py                  # 64 stand-ins, 50 rounds
    .venv/bin/python benchmarks/driver_soak.py --real           # real engines, 15 rounds
    .venv/bin/python benchmarks/driver_soak.py --from-run runs/driver_soak/standin-64   # the figures again

Run it from the repository root (Ray's workers import the stand-in's base class from `benchmarks.`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402

import orchestrator.cluster  # noqa: E402
from actors.types import Prompt, PromptChunk  # noqa: E402
from benchmarks.rollout_scaling import SleepGenerator  # noqa: E402
from orchestrator.config import OdpoConfig, load_config  # noqa: E402
from orchestrator.driver import run  # noqa: E402

SOAK_ROUNDS = 50
RSS_GROWTH_LIMIT = 0.10
"""Clear growth: the fitted RSS slope over SOAK_ROUNDS rounds adds more than this share of the mean RSS ..."""
CPU_GROWTH_LIMIT = 1.5
"""... or the last five rounds' mean CPU seconds are over this multiple of the first five's."""
WINDOW = 5
WARMUP_ROUNDS = 2
CHUNK_SIZE = 2
CHUNKS_PER_ACTOR = 2


class StandInEngine(SleepGenerator):
    """`SleepGenerator` behind an engine's constructor arguments (actors/generator.py), so that the cluster's
    own `generators` builds, places and syncs a pool of it as it does a pool of real engines."""

    chunk_seconds = 0.5
    """Set from --chunk-seconds before the pool is built; this module runs as __main__, so Ray pickles the
    class by value, this attribute included."""

    def __init__(self, cfg, model_path: str, tokenizer_path: str, dtype: str, max_prompt_length: int,
                 trust_remote_code: bool = False, name: str = "generator"):
        super().__init__(self.chunk_seconds, cfg.n, name)

    def process_ids(self) -> list[int]:
        return [os.getpid()]


def soak_config(out_dir: str, name: str, actors: int, rounds: int, prompts_file: str) -> OdpoConfig:
    return load_config("configs/tiny.yaml", [
        "scorer.type=function", "eval.prompts=0", "metrics.wandb=false", "generator.backend=hf",
        "ray.include_dashboard=false", f"run.output_dir={out_dir}", f"run.name={name}", "run.overwrite=true",
        f"run.rounds={rounds}", f"data.path={prompts_file}", f"generator.num_actors={actors}",
        "generator.cpus_per_actor=0.25", "scorer.cpus_per_actor=0.5", f"generator.chunk_size={CHUNK_SIZE}",
        f"data.prompts_per_round={CHUNKS_PER_ACTOR * CHUNK_SIZE * actors}"])


def write_prompts(path: str, rows: int) -> str:
    """configs/data/tiny_prompts.jsonl repeated to `rows` rows (each its own uid: every round's are fresh)."""
    lines = open("configs/data/tiny_prompts.jsonl").read().splitlines()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(lines[i % len(lines)] + "\n" for i in range(rows))
    return path


def engine_uss_mb(cfg: OdpoConfig, policy_path: str) -> float:
    """Unique memory (USS) of one generator actor of `cfg`'s engine, built by the cluster as the run builds
    it, after it has answered one chunk (an engine's buffers grow with its first generation)."""
    with orchestrator.cluster.Cluster(cfg) as cluster:
        pool = cluster.generators(policy_path, policy_path)
        pool.wait_ready()
        actor = pool.actors[0]
        chunk = PromptChunk(round=0, chunk_id=0, seed=0, prompts=[
            Prompt(uid=i, messages=[{"role": "user", "content": "Write about rain. Be brief."}])
            for i in range(CHUNK_SIZE)])
        ray.get(actor.generate_with_meta.options(num_returns=2).remote(chunk)[0])
        pid = ray.get(actor.process_ids.remote())[0]
        return psutil.Process(pid).memory_full_info().uss / 2**20


def fitting_actors(cfg: OdpoConfig, policy_path: str, reserve_gb: float) -> tuple[int, str]:
    """How many generator actors of `cfg`'s engine this machine's memory holds, and how that was found."""
    uss = engine_uss_mb(cfg, policy_path)
    available = psutil.virtual_memory().available / 2**20
    fit = max(1, int((available - reserve_gb * 1024) / uss))
    return fit, (f"one engine's USS {uss:.0f} MB; available {available / 1024:.1f} GiB less {reserve_gb:.1f} GiB "
                 f"reserved (the other pools, the driver, Ray's daemons, other work) holds {fit}")


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys against their index (per round)."""
    return float(np.polyfit(np.arange(len(ys)), ys, 1)[0])


def summarize(run_dir: str) -> bool:
    """Print the run's driver figures; True when they show clear growth (printing why)."""
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    rows = [m for m in lines if m["round"] >= WARMUP_ROUNDS]
    if len(rows) < 2 * WINDOW:
        raise SystemExit(f"{run_dir}: {len(rows)} rounds after the warm-up; at least {2 * WINDOW} are needed")
    cpu = [m["driver/cpu_s"] for m in rows]
    rss = [m["driver/rss_mb"] for m in rows]
    wall = [m["timing/round"] for m in rows]
    print(f"{run_dir}: {len(lines)} rounds, {lines[-1]['pool/generators']} generator actors "
          f"({np.mean([m['gen/actors_used'] for m in rows]):.1f} used a round on average), "
          f"{lines[-1]['prompts/count']} prompts a round")
    print("  warm-up, left out: " + ", ".join(f"round {m['round']} driver CPU {m['driver/cpu_s']:.2f} s RSS "
                                             f"{m['driver/rss_mb']:.0f} MB" for m in lines[:WARMUP_ROUNDS]))
    print("  rounds      driver CPU s/round   RSS MB   round wall s   driver CPU / wall")
    for k in range(0, len(rows), WINDOW):
        b = slice(k, k + WINDOW)
        print(f"  {rows[k]['round']:3d}-{rows[min(k + WINDOW, len(rows)) - 1]['round']:<3d}   {np.mean(cpu[b]):16.2f}"
              f"   {np.mean(rss[b]):6.0f}   {np.mean(wall[b]):12.1f}   {np.sum(cpu[b]) / np.sum(wall[b]):17.0%}")
    first_cpu, last_cpu = np.mean(cpu[:WINDOW]), np.mean(cpu[-WINDOW:])
    first_rss, last_rss = np.mean(rss[:WINDOW]), np.mean(rss[-WINDOW:])
    rss_slope, cpu_slope = slope(rss), slope(cpu)
    print(f"  CPU s/round: first {WINDOW} {first_cpu:.3f}, last {WINDOW} {last_cpu:.3f}, ratio {last_cpu / first_cpu:.3f}; "
          f"slope {cpu_slope:+.4f} s/round ({cpu_slope * SOAK_ROUNDS / np.mean(cpu):+.1%} of the mean over "
          f"{SOAK_ROUNDS} rounds)")
    print(f"  RSS MB:      first {WINDOW} {first_rss:.1f}, last {WINDOW} {last_rss:.1f}, ratio {last_rss / first_rss:.3f}; "
          f"slope {rss_slope:+.3f} MB/round ({rss_slope * SOAK_ROUNDS / np.mean(rss):+.1%} of the mean over "
          f"{SOAK_ROUNDS} rounds)")
    growth = []
    if rss_slope * SOAK_ROUNDS > RSS_GROWTH_LIMIT * np.mean(rss):
        growth.append(f"RSS grows {rss_slope:.2f} MB/round: {rss_slope * SOAK_ROUNDS:.0f} MB over {SOAK_ROUNDS} "
                      f"rounds, over {RSS_GROWTH_LIMIT:.0%} of the mean {np.mean(rss):.0f} MB")
    if last_cpu > CPU_GROWTH_LIMIT * first_cpu:
        growth.append(f"CPU per round grows: the last {WINDOW} rounds' {last_cpu:.2f} s is over "
                      f"{CPU_GROWTH_LIMIT}x the first {WINDOW}'s {first_cpu:.2f} s")
    for why in growth:
        print(f"  GROWTH: {why}")
    if not growth:
        print("  flat: no clear growth of the driver's CPU or memory per round")
    return bool(growth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", action="store_true", help="transformers engines, as many as memory holds")
    ap.add_argument("--actors", type=int, help="generator actors (default: 64 stand-ins, or what memory holds)")
    ap.add_argument("--rounds", type=int, help=f"default: {SOAK_ROUNDS} with stand-ins, 15 with --real")
    ap.add_argument("--chunk-seconds", type=float, default=0.5, help="the stand-in's time per chunk")
    ap.add_argument("--reserve-gb", type=float, default=8.0,
                    help="memory left to the other pools, the driver, Ray and other work when sizing the pool")
    ap.add_argument("--output-dir", default="runs/driver_soak")
    ap.add_argument("--from-run", help="only print the figures of a finished run directory")
    args = ap.parse_args()
    if args.from_run:
        sys.exit(1 if summarize(args.from_run) else 0)

    rounds = args.rounds or (15 if args.real else SOAK_ROUNDS)
    if not args.real:
        StandInEngine.chunk_seconds = args.chunk_seconds
        orchestrator.cluster.generator_class = lambda backend: StandInEngine  # this process only
    from actors.models import materialize_builtin

    policy = materialize_builtin("builtin:tiny-llama", os.path.join(args.output_dir, "probe_policy"), seed=0)
    wanted = args.actors or (None if args.real else 64)
    fit, how = fitting_actors(soak_config(args.output_dir, "probe", 1, 1, "configs/data/tiny_prompts.jsonl"),
                              policy, args.reserve_gb)
    print(f"{'transformers engine' if args.real else 'stand-in engine'}: {how} ({os.cpu_count()} cores)")
    actors = min(wanted or fit, fit)
    if wanted and actors < wanted:
        print(f"{wanted} actors do not fit in memory here; using {actors}")
    name = f"{'real' if args.real else 'standin'}-{actors}"
    prompts = write_prompts(os.path.join(args.output_dir, "prompts.jsonl"),
                            rounds * CHUNKS_PER_ACTOR * CHUNK_SIZE * actors)
    cfg = soak_config(args.output_dir, name, actors, rounds, prompts)
    print(f"{name}: {actors} generator actors x {cfg.generator.cpus_per_actor} CPU, {rounds} rounds of "
          f"{cfg.data.prompts_per_round} prompts (chunks of {CHUNK_SIZE}, n={cfg.generator.n})"
          + ("" if args.real else f", {args.chunk_seconds} s a chunk"), flush=True)
    run_dir = run(cfg)
    growth = summarize(run_dir)
    sys.exit(1 if growth else 0)


if __name__ == "__main__":
    main()
