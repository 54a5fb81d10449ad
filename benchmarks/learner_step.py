"""The learner's optimizer step on the real model, against this machine's own matmul rate.

One DeepSpeed learner rank in this process (ZeRO-2, gloo, `--threads` CPU threads as a rank with that many
CPUs gets), on builtin:smollm2-135m-instruct (or the tiny policy), with pairs shaped like the real-model
task's (prompts of 40-60 tokens, responses of 4-20). Side by side in one run:

0. a full global batch (8 pairs, 2 micro-batches of 4) as full rows, each response with its own copy of the
   prompt (the learner before issue 13; today's path under gradient checkpointing);
1. the same batch with each prompt computed once, its cache shared by both responses, the reference forward
   in the step;
2. the same batch with the reference log-probs computed ahead (the stream's reference stage), the step then
   skips that forward; the reference call's own seconds are printed beside it;
3. a partial batch of 3 of those pairs: before issue 13 it cost what the full batch costs (padded with
   zero-weight pairs), now it costs its real pairs;
4. the learner's useful FLOP/s (linear layers, real tokens; 3 forwards' worth per policy token, one more for
   the reference) against a 1024^3 matmul at the same threads and dtype (the machine's rate);
5. the evaluation's KL terms for 16 prompts x 4 samples: full rows (before issue 13) against each prompt
   computed once, its cache shared by its samples (`Learner.log_ratios`).

Plus the padding that length grouping saves on the round's pairs (token positions computed, sorted against
arrival order).

    .venv/bin/python benchmarks/learner_step.py [--model smollm2|tiny] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from actors.learner import Learner, length_grouped, micro_steps  # noqa: E402
from actors.losses import build_sequences, sequence_logprobs  # noqa: E402
from actors.models import materialize_builtin  # noqa: E402
from actors.types import Pair  # noqa: E402
from orchestrator.config import LearnerConfig  # noqa: E402


def matmul_flops(threads: int, dtype: torch.dtype, n: int = 1024, reps: int = 20) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def task_pairs(count: int, vocab: int, seed: int = 0) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(3, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    return [Pair(uid=i, round=0, weight_version=0, prompt_messages=[], prompt_text="", prompt_ids=ids(40, 60),
                 chosen="", rejected="", chosen_ids=ids(4, 20), rejected_ids=ids(4, 20), chosen_score=1.0,
                 rejected_score=0.0) for i in range(count)]


def timed_step(lrn: Learner, pairs: list[Pair], batch: int, repeats: int) -> tuple[float, dict]:
    runs = [lrn.train_step(pairs, pairs[0], batch) for _ in range(repeats)]
    return statistics.median(r["seconds"] for r in runs), runs[-1]


def computed_positions(groups: list[list[Pair]], cap: int) -> int:
    total = 0
    for g in groups:
        ids, _, _ = build_sequences([p.prompt_ids for p in g] * 2, [p.chosen_ids for p in g] + [p.rejected_ids for p in g],
                                    0, cap)
        total += ids.numel()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the learner's dtype (bfloat16: DeepSpeed bf16, fp32 master weights); the ratio is taken "
                         "against a matmul in the same dtype")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        path = materialize_builtin("builtin:smollm2-135m-instruct", "", 0)
    else:
        path = materialize_builtin("builtin:tiny-llama", tempfile.mkdtemp(prefix="odpo-bench-"), seed=0)
    cfg = LearnerConfig(global_batch_size=8, micro_batch_size=4, lr=1e-6, zero_stage=2, warmup_ratio=0.0,
                        cpus_per_rank=args.threads, max_length=128)
    lrn = Learner(cfg, path, args.dtype, rank=0, world_size=1, pad_id=0)
    lrn.setup(*lrn.rendezvous_address())
    torch.set_num_threads(args.threads)
    lrn.start_round(0, total_steps=100)
    vocab = lrn.engine.module.config.vocab_size
    pairs = task_pairs(8, vocab)
    lrn.train_step(pairs[:2], pairs[0], 8)  # warm-up: allocations, first-call costs

    full_s, full = timed_step(lrn, pairs, 8, args.repeats)
    lrn.cfg.gradient_checkpointing = True  # selects the full-row path (each response with its own copy of the
    rows_s, rows = timed_step(lrn, pairs, 8, args.repeats)  # prompt), as before issue 13; checkpointing stays off
    lrn.cfg.gradient_checkpointing = False
    start = time.perf_counter()
    ref = lrn.reference_logprobs(pairs)
    ref_s = time.perf_counter() - start
    ahead = [dataclasses.replace(p, ref_chosen_logp=c, ref_rejected_logp=r) for p, (c, r) in zip(pairs, ref["logps"])]
    ahead_s, ahead_stats = timed_step(lrn, ahead, 8, args.repeats)
    partial_s, partial = timed_step(lrn, pairs[:3], 3, args.repeats)

    peak32 = matmul_flops(args.threads, torch.float32)
    peak16 = matmul_flops(args.threads, torch.bfloat16)
    peak = peak16 if args.dtype == "bfloat16" else peak32
    params = sum(p.numel() for p in lrn.engine.module.parameters())
    print(f"model: {args.model} ({params / 1e6:.1f}M parameters), {args.dtype}, 1 rank, {args.threads} thread(s), "
          f"ZeRO-2; batch of 8 pairs in micro-batches of 4; {full['tokens']} real tokens in the full batch")
    print(f"machine: 1024^3 matmul at {args.threads} thread(s): float32 {peak32 / 1e9:.1f} GFLOP/s, "
          f"bfloat16 {peak16 / 1e9:.1f} GFLOP/s")
    print()
    print(f"{'step':<44}{'seconds':>9}{'GFLOP/s':>10}{'vs matmul':>11}{'vs full':>9}")
    rows = [("full batch, prompt twice (full rows, before)", rows_s, rows),
            ("full batch, reference in the step", full_s, full),
            ("full batch, reference computed ahead", ahead_s, ahead_stats),
            ("partial batch: 3 of 8 pairs", partial_s, partial)]
    for name, s, stats in rows:
        rate = stats["flops"] / s
        print(f"{name:<44}{s:>9.2f}{rate / 1e9:>10.1f}{rate / peak:>11.2f}{s / full_s:>9.2f}")
    print(f"{'  the reference call for those 8 pairs':<44}{ref_s:>9.2f}{ref['flops'] / ref_s / 1e9:>10.1f}"
          f"{ref['flops'] / ref_s / peak:>11.2f}{ref_s / full_s:>9.2f}")
    print()
    print(f"partial batch: {partial_s / full_s:.2f} of a full batch's time for {3 / 8:.2f} of its pairs "
          f"(padded to the full batch, as before, it was 1.00)")
    print(f"reference ahead: the step takes {ahead_s / full_s:.2f} of the step with the reference forward in it")
    print(f"prompt once per pair: the step takes {full_s / rows_s:.2f} of the full-row step's time; with the reference "
          f"ahead {ahead_s / rows_s:.2f}")

    # the evaluation's KL terms: 16 prompts x 4 samples, full rows (before) against each prompt computed once
    kl_pairs = task_pairs(32, vocab, seed=2)
    prompts = [p.prompt_ids for p in kl_pairs[:16] for _ in range(4)]
    responses = [r for p in kl_pairs for r in (p.chosen_ids, p.rejected_ids)]
    start = time.perf_counter()
    with torch.no_grad():
        lrn.engine.eval()
        rows = []
        for s in range(0, len(prompts), 4):
            ids, attn, resp = build_sequences(prompts[s: s + 4], responses[s: s + 4], 0, 128)
            rows.append(sequence_logprobs(lrn.engine(input_ids=ids, attention_mask=attn).logits, ids, resp)
                        - sequence_logprobs(lrn.reference(input_ids=ids, attention_mask=attn).logits, ids, resp))
        lrn.engine.train()
    full_rows_s = time.perf_counter() - start
    shared = lrn.log_ratios(prompts, responses)
    worst = float((torch.cat(rows) - torch.tensor(shared["ratios"])).abs().max())
    print(f"evaluation KL, 16 prompts x 4 samples: full rows {full_rows_s:.2f} s, prompt computed once per prompt "
          f"{shared['seconds']:.2f} s ({shared['seconds'] / full_rows_s:.2f}); largest difference {worst:.1e}")

    many = task_pairs(64, vocab, seed=1)
    steps = micro_steps(8, 1, 4)
    arrival = [[p for p in many[s: s + 8][k * 4:(k + 1) * 4]] for s in range(0, 64, 8) for k in range(steps)]
    grouped = [g for s in range(0, 64, 8) for g, _ in length_grouped(many[s: s + 8], None, steps)]
    a, g = computed_positions(arrival, 128), computed_positions(grouped, 128)
    real = sum(len(p.prompt_ids) + len(r) for p in many for r in (p.chosen_ids, p.rejected_ids))
    print(f"length grouping, 64 pairs in batches of 8: {g} token positions computed against {a} in arrival order "
          f"({g / a:.3f}); padding share {1 - real / g:.3f} against {1 - real / a:.3f}")


if __name__ == "__main__":
    main()
