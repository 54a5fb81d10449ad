"""How much the round's stages overlap: streaming-phase wall time against the sum of stage busy times.

Runs the tiny config (or CONFIG with overrides) and, for each round, prints

    overlap = (generate busy + score busy + train busy) / streaming wall time

A value above 1 means stages ran at the same time (a strictly sequential pipeline gives <= 1). It also
prints when the first chunk was scored and the first batch trained, against when generation ended.

    .venv/bin/python benchmarks/streaming_overlap.py [CONFIG] [key=value ...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.config import load_config  # noqa: E402
from orchestrator.driver import run  # noqa: E402


def main(argv: list[str]) -> None:
    config = argv[0] if argv and argv[0].endswith((".yaml", ".yml")) else "configs/tiny.yaml"
    overrides = [a for a in argv if "=" in a]
    with tempfile.TemporaryDirectory() as tmp:
        # the loop alone, as the figures in docs/benchmarks.md were taken: the rule as the reward (no reward
        # model trained first), no held-out evaluation; overrides may change both
        cfg = load_config(config, [f"run.output_dir={tmp}", "run.name=bench", "metrics.wandb=false",
                                   "scorer.type=function", "eval.prompts=0", *overrides])
        run_dir = run(cfg)
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    print()
    print("round  stream_wall_s  gen_busy_s  score_busy_s  train_busy_s  busy/wall  first_scored_s  first_train_s  "
          "gen_end_s  round_wall_s  round_busy/wall")
    for m in rows:
        round_busy = m["timing/generate"] + m["timing/score"] + m["timing/train"] + m["timing/sync"] + m["timing/checkpoint"]
        print(f"{m['round']:5d}  {m['timing/stream']:13.2f}  {m['timing/generate']:10.2f}  {m['timing/score']:12.3f}  "
              f"{m['timing/train_streamed']:12.2f}  {m['stream/overlap']:9.2f}  {m['stream/first_scored_s']:14.2f}  "
              f"{m['stream/first_train_s']:13.2f}  {m['timing/generate_span']:9.2f}  {m['timing/round']:12.2f}  "
              f"{round_busy / m['timing/round']:15.2f}")
    mean = sum(m["stream/overlap"] for m in rows) / len(rows)
    print(f"\nmean over rounds of (generate + score + train busy) / streaming wall time: {mean:.2f}")
    print("(above 1: stages ran at the same time; a stage-after-stage pipeline cannot exceed 1)")

if __name__ == "__main__":
    main(sys.argv[1:])
