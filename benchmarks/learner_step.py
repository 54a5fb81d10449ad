"""The learner's optimizer step on the real model, against this machine's own matmul rate.

One DeepSpeed learner rank in this process (gloo, `--threads` CPU threads as a rank with that many CPUs gets),
on builtin:smollm2-135m-instruct (or the tiny policy), with pairs shaped like the real-model task's (prompts of
40-60 tokens, responses of 4-20), the reference log-probs computed ahead (as the stream does). Side by side:

A. the learner's settings, one change at a time, from issue 13's (ZeRO-2, micro-batches of 4 pairs, sdpa
   attention, torch's foreach AdamW) to today's configs/smollm2.yaml (ZeRO-0 for its one rank, the batch of 8 in
   one micro-batch, eager attention, fused AdamW, each pair's responses packed after its prompt in one forward
   instead of the prompt's KV cache repeated into a second): each step's seconds, useful FLOP/s (linear layers on real
   tokens, the output head only where a prediction is read, 3 forwards' worth) and that over a 1024^3 matmul
   at the same threads and dtype, measured beside each variant (`actors.learner.matmul_flops`, what a run
   measures at start-up for `profile/learner_vs_peak`). Then today's settings on a batch of
   16 pairs: what a step costs whatever its size (the optimizer, DeepSpeed's bf16 bookkeeping) spread thinner.

Then, on today's settings:
0. the full batch as full rows, each response with its own copy of the prompt (the learner before issue 13;
   today's path for a model whose attention takes no 4D mask);
1. each prompt computed once, both responses packed after it, the reference forward in the step;
2. the reference log-probs computed ahead (the stream's reference stage): the step skips that forward; the
   reference call's own seconds are printed beside it;
3. a partial batch of 3 of those pairs: it costs its real pairs, not a full batch's;
4. the evaluation's KL terms for 16 prompts x 4 samples: full rows against each prompt computed once, its
   samples packed after it (`Learner.log_ratios`);
and the padding that length grouping saves on the round's pairs (token positions computed, sorted against
arrival order).

    .venv/bin/python benchmarks/learner_step.py [--model smollm2|tiny] [--threads 1] [--repeats 3] [--dtype auto]
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
import torch.nn.functional as F  # noqa: E402

import actors.learner as learner_module  # noqa: E402
from actors.learner import Learner, length_grouped, micro_steps  # noqa: E402
from actors.learner import matmul_flops as learner_matmul_flops  # noqa: E402
from actors.losses import (  # noqa: E402
    build_sequences,
    cut_to_fit,
    left_padded,
    needed_positions,
    sequence_logprobs,
    shared_prompt_token_logprobs,
)
from actors.models import materialize_builtin  # noqa: E402
from actors.types import Pair  # noqa: E402
from orchestrator.config import CPU_BF16_FLAGS, LearnerConfig, cpu_flags  # noqa: E402


def matmul_flops(threads: int, dtype: torch.dtype) -> float:
    """A 1024^3 matmul's FLOP/s at `threads` CPU threads: what a run's learner measures at start-up."""
    torch.set_num_threads(threads)
    return learner_matmul_flops(torch.device("cpu"), dtype)


def task_pairs(count: int, vocab: int, seed: int = 0) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(3, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    return [Pair(uid=i, round=0, weight_version=0, prompt_messages=[], prompt_text="", prompt_ids=ids(40, 60),
                 chosen="", rejected="", chosen_ids=ids(4, 20), rejected_ids=ids(4, 20), chosen_score=1.0,
                 rejected_score=0.0) for i in range(count)]


def reference_ahead(lrn: Learner, pairs: list[Pair]) -> list[Pair]:
    """`pairs` with their reference log-probs filled in, as the stream's reference stage hands them to a step."""
    ref = lrn.reference_logprobs(pairs)["logps"]
    return [dataclasses.replace(p, ref_chosen_logp=c, ref_rejected_logp=r) for p, (c, r) in zip(pairs, ref)]


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


VARIANTS = (  # name, settings, torch's AdamW implementation, packed (False: the prompt's KV cache, as before)
    ("issue 13: ZeRO-2, micro 4, sdpa, foreach AdamW", dict(zero_stage=2, micro_batch_size=4, attention="sdpa"), "foreach",
     False),
    ("  fused AdamW", dict(zero_stage=2, micro_batch_size=4, attention="sdpa"), "fused", False),
    ("  ZeRO-0 (one rank)", dict(zero_stage=0, micro_batch_size=4, attention="sdpa"), "fused", False),
    ("  eager attention", dict(zero_stage=0, micro_batch_size=4, attention="eager"), "fused", False),
    ("  one micro-batch of 8", dict(zero_stage=0, micro_batch_size=8, attention="eager"), "fused", False),
    ("  responses packed after their prompt (today)", dict(zero_stage=0, micro_batch_size=8, attention="eager"), "fused",
     True),
)


def cached_prompt_token_logprobs(model, prompts, responses, pad_id, max_length, packed=False):
    """The learner's form before packing (issue 24's first pass): the prompts left-padded in one forward, their KV
    cache repeated for their responses, which run right-padded after it in a second forward."""
    cut = [[cut_to_fit(p, r, max_length) for r in rs] for p, rs in zip(prompts, responses)]
    kept = [c[0][0] if c else p for c, p in zip(cut, prompts)]
    ids, mask, positions = left_padded(kept, pad_id)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=torch.tensor([ids.shape[1] - 1]))
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)
    owner = torch.tensor([i for i, c in enumerate(cut) for _ in c], dtype=torch.long)
    flat = [r for c in cut for _, r in c]
    cache = out.past_key_values
    cache.batch_select_indices(owner)
    rwidth = max(1, max(len(r) for r in flat))
    rids = torch.full((len(flat), rwidth), pad_id, dtype=torch.long)
    rmask = torch.zeros((len(flat), rwidth), dtype=torch.long)
    for j, r in enumerate(flat):
        rids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        rmask[j, : len(r)] = 1
    positions = mask.sum(-1)[owner][:, None] + torch.arange(rwidth)[None, :]
    logits = model(input_ids=rids, attention_mask=torch.cat([mask[owner], rmask], dim=1), position_ids=positions,
                   past_key_values=cache, use_cache=True).logits[:, :-1].float()
    rest = torch.gather(F.log_softmax(logits, dim=-1), 2, rids[:, 1:].unsqueeze(-1)).squeeze(-1)
    head = first[owner].gather(1, rids[:, :1])
    return torch.cat([head, rest], dim=1), rmask.to(head.dtype)


def useful_flops(lrn: Learner, pairs: list[Pair], forwards: int) -> float:
    """The work a step over `pairs` needs, whichever form computes it (the same figure for every row, so the rows
    compare seconds): the linear layers on each prompt once and each response but its last token, the output head
    where a prediction is read, `forwards` forwards' worth (3: forward and backward; 4 with the reference's)."""
    needed = needed_positions([p.prompt_ids for p in pairs], [[p.chosen_ids, p.rejected_ids] for p in pairs],
                              lrn.cfg.max_length)
    return forwards * lrn.forward_flops(*needed)


def use_kv_cache(lrn: Learner) -> None:
    """This learner computes its pairs as before packing: through `cached_prompt_token_logprobs`."""
    lrn.packing = False
    learner_module.shared_prompt_token_logprobs = cached_prompt_token_logprobs


def build(path: str, dtype: str, threads: int, adam: str, global_batch_size: int = 8, **settings) -> Learner:
    cfg = LearnerConfig(global_batch_size=global_batch_size, lr=1e-6, warmup_ratio=0.0, cpus_per_rank=threads, max_length=128,
                        **settings)
    lrn = Learner(cfg, path, dtype, rank=0, world_size=1, pad_id=0)
    import deepspeed  # noqa: F401  (imported before the patch below: it subclasses AdamW at import)

    fused_adamw = torch.optim.AdamW
    if adam == "foreach":  # the learner before issue 24 built torch's default (foreach) AdamW
        torch.optim.AdamW = lambda params, fused=None, **kw: fused_adamw(params, **kw)
    try:
        lrn.setup(*lrn.rendezvous_address())
    finally:
        torch.optim.AdamW = fused_adamw
    torch.set_num_threads(threads)
    lrn.start_round(0, total_steps=100)
    return lrn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="the learner's dtype (bfloat16: DeepSpeed bf16, fp32 master weights; auto: bfloat16 where the "
                         "CPU has avx512_bf16 or AMX, as policy.dtype=auto); the ratio is taken against a matmul in the "
                         "same dtype")
    args = ap.parse_args()
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if cpu_flags() & set(CPU_BF16_FLAGS) else "float32"

    torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        path = materialize_builtin("builtin:smollm2-135m-instruct", "", 0)
    else:
        path = materialize_builtin("builtin:tiny-llama", tempfile.mkdtemp(prefix="odpo-bench-"), seed=0)
    peak_of = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    print(f"model: {args.model}, {dtype}, 1 rank, {args.threads} thread(s); batch of 8 pairs, the reference computed "
          f"ahead; median of {args.repeats} steps each")
    print(f"{'learner settings':<52}{'seconds':>9}{'GFLOP/s':>10}{'matmul':>9}{'vs matmul':>11}{'vs first':>10}")
    first_s, pairs, ahead = None, None, None
    for name, settings, adam, packed in VARIANTS:
        learner_module.shared_prompt_token_logprobs = shared_prompt_token_logprobs
        lrn = build(path, dtype, args.threads, adam, **settings)
        if not packed:
            use_kv_cache(lrn)
        if pairs is None:
            vocab_size = lrn.engine.module.config.vocab_size
            pairs = task_pairs(8, vocab_size)
            ahead = reference_ahead(lrn, pairs)
        lrn.train_step(ahead[:2], ahead[0], 8)  # warm-up: allocations, first-call costs
        s, stats = timed_step(lrn, ahead, 8, args.repeats)
        peak = matmul_flops(args.threads, peak_of)
        first_s = first_s or s
        rate = useful_flops(lrn, ahead, 3) / s
        print(f"{name:<52}{s:>9.2f}{rate / 1e9:>10.1f}{peak / 1e9:>9.1f}{rate / peak:>11.2f}{s / first_s:>10.2f}")
        if name != VARIANTS[-1][0]:
            del lrn
    print(f"({stats['tokens']} tokens in the batch's full rows, {useful_flops(lrn, ahead, 3) / 1e9:.0f} GFLOP of useful "
          f"work a step)")
    # what a step costs whatever its size (the optimizer and DeepSpeed's bf16 bookkeeping) weighs less per pair
    # in a larger batch: the same settings, 16 pairs in one micro-batch
    big = build(path, dtype, args.threads, "fused", **VARIANTS[-1][1] | dict(micro_batch_size=16), global_batch_size=16)
    more = reference_ahead(big, task_pairs(16, vocab_size))
    big.train_step(more[:2], more[0], 16)
    s16, stats16 = timed_step(big, more, 16, args.repeats)
    peak = matmul_flops(args.threads, peak_of)
    work16 = useful_flops(big, more, 3)
    print(f"{'  today, a batch of 16 pairs (one micro-batch)':<52}{s16:>9.2f}{work16 / s16 / 1e9:>10.1f}"
          f"{peak / 1e9:>9.1f}{work16 / s16 / peak:>11.2f}{'':>10}")
    del big
    print()

    full_s, full = timed_step(lrn, pairs, 8, args.repeats)
    learner_module.shared_prompt_token_logprobs = shared_prompt_token_logprobs
    lrn.packing = False  # full rows, each response with its own copy of the prompt, as before issue 13
    rows_s, rows = timed_step(lrn, pairs, 8, args.repeats)
    lrn.packing = True
    start = time.perf_counter()
    lrn.reference_logprobs(pairs)
    ref_s = time.perf_counter() - start
    ahead_s, ahead_stats = timed_step(lrn, ahead, 8, args.repeats)
    partial_s, partial = timed_step(lrn, ahead[:3], 3, args.repeats)
    peak = matmul_flops(args.threads, peak_of)
    print(f"today's settings; matmul at {args.threads} thread(s), {dtype}: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'step':<44}{'seconds':>9}{'GFLOP/s':>10}{'vs matmul':>11}{'vs full':>9}")
    rows = [("full batch, prompt twice (full rows, before)", rows_s, useful_flops(lrn, pairs, 4)),
            ("full batch, reference in the step", full_s, useful_flops(lrn, pairs, 4)),
            ("full batch, reference computed ahead", ahead_s, useful_flops(lrn, pairs, 3)),
            ("partial batch: 3 of 8 pairs (reference ahead)", partial_s, useful_flops(lrn, pairs[:3], 3)),
            ("  the reference call for those 8 pairs", ref_s, useful_flops(lrn, pairs, 1))]
    for name, s, work in rows:
        rate = work / s
        print(f"{name:<44}{s:>9.2f}{rate / 1e9:>10.1f}{rate / peak:>11.2f}{s / full_s:>9.2f}")
    print()
    print(f"partial batch: {partial_s / ahead_s:.2f} of a full batch's time for {3 / 8:.2f} of its pairs "
          f"(padded to the full batch, as before issue 13, it was 1.00)")
    print(f"reference ahead: the step takes {ahead_s / full_s:.2f} of the step with the reference forward in it")
    print(f"prompt once per pair: the step takes {full_s / rows_s:.2f} of the full-row step's time; with the reference "
          f"ahead {ahead_s / rows_s:.2f}")

    vocab = lrn.engine.module.config.vocab_size
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
