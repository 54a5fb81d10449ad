"""The offline DPO baseline (`run.mode=offline`): the same rounds, learner, schedule, weight sync, checkpoints
and evaluation as online iterative DPO, trained on a pair set fixed before the first step. The two modes
differ only in where a round's pairs come from.

    offline.dataset: null   every round's pairs are drawn from the initial policy (weight version 0) on that
                            round's prompts, by the same generators, scorer and pair choice, all before
                            training; round 0's pairs are exactly online round 0's
    offline.dataset: PATH   a preference dataset (prompt, chosen, rejected), trained on exactly:
                            data.prompts_per_round rows per round, in file order

Each round trains its slice as an online round trains its pairs: epoch 1 in order (the order streaming
releases them), epochs 2..E reshuffled with the same seeds. Each round's set is written to
`<run dir>/offline/round_<k>.jsonl` (generation statistics, then the pairs with their token ids) beside
`settings.json` (what they were made with), so a resumed run trains on the same pairs and makes only the
rounds it lacks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass

from actors.models import render_prompt
from actors.types import Pair
from orchestrator.config import TRAINED_REWARD_MODEL, InputError, OdpoConfig
from orchestrator.data import PromptSource
from orchestrator.outputs import RunDir, write_atomic
from orchestrator.pools import ActorPool
from orchestrator.progress import RoundProgress
from orchestrator.streaming import RoundStream, replay_epochs, stream_round

SETTINGS_FILE = "settings.json"
"""Beside the rounds' files: the settings they were made with (fingerprint)."""

SAVED_FIELDS = ("pairs", "drops", "rewards", "response_chars", "new_tokens", "comparisons", "chunks")
"""What a drawn round keeps of its stream: its pairs and the generation statistics its metrics report."""


@dataclass
class PairSet:
    """The run's fixed pairs, round by round: loaded, made from the dataset, or (None) still to be drawn."""

    folder: str
    rounds: list[RoundStream | None]


def fingerprint(cfg: OdpoConfig) -> dict:
    """The settings a fixed pair set was made with: saved pairs are used only under the same ones."""
    from orchestrator.reward_training import training_record

    common = {"data.prompts_per_round": cfg.data.prompts_per_round, "policy": [cfg.policy.path, cfg.policy.tokenizer],
              "max_prompt_length": cfg.data.max_prompt_length, "offline.dataset": cfg.offline.dataset}
    if cfg.offline.dataset is not None:
        return common
    g, s = cfg.generator, cfg.scorer
    return {**common, "run.seed": cfg.run.seed, "data": dataclasses.asdict(cfg.data), "pairs": dataclasses.asdict(cfg.pairs),
            "generator": {k: getattr(g, k) for k in ("n", "temperatures", "top_p", "top_k", "max_new_tokens",
                                                     "stop_token_ids", "chunk_size")},
            "scorer": {k: getattr(s, k) for k in ("type", "function", "model_path", "max_length", "pairwise_both_orders")}
            | {k: getattr(s, k) for k, default in (("output_field", "logits"), ("pairwise_generation_prompt", True))
               if getattr(s, k) != default},  # keys added later count only when set: older pair sets still resume
            "reward_training": training_record(cfg)["reward_training"] if s.model_path == TRAINED_REWARD_MODEL else None}


def prepare(cfg: OdpoConfig, out: RunDir, tokenizer) -> PairSet:
    """Before Ray starts: reuse the rounds an earlier driver fixed under the same settings (made under other
    settings, they are made again, or the resume is refused once a round trained on them), and turn the
    dataset's rows into the rounds still missing, so a bad dataset stops the run before anything starts."""
    folder = out.sub("offline")
    if not out.made_with(folder, SETTINGS_FILE, fingerprint(cfg), "offline pair set"):
        os.makedirs(folder)
        write_atomic(os.path.join(folder, SETTINGS_FILE), json.dumps(fingerprint(cfg), indent=1))
    paths = [os.path.join(folder, f"round_{r}.jsonl") for r in range(cfg.run.rounds)]
    rounds: list[RoundStream | None] = [load_round(p) if os.path.exists(p) else None for p in paths]
    if cfg.offline.dataset is not None and None in rounds:
        made = dataset_rounds(cfg, tokenizer)
        for r, p in enumerate(paths):
            if rounds[r] is None:
                rounds[r] = made[r]
                save_round(p, made[r])
    return PairSet(folder, rounds)


def complete(fixed: PairSet, cfg: OdpoConfig, source: PromptSource, generators: ActorPool,
             scorers: ActorPool) -> list[RoundStream]:
    """Draw the rounds still missing from the initial policy (the generators must hold the initial weights)."""
    drawn = 0
    for r, stream in enumerate(fixed.rounds):
        if stream is None:
            fixed.rounds[r] = draw_round(r, cfg, source, generators, scorers)
            save_round(os.path.join(fixed.folder, f"round_{r}.jsonl"), fixed.rounds[r])
            drawn += 1
    rounds: list[RoundStream] = [s for s in fixed.rounds if s is not None]
    origin = f"from {cfg.offline.dataset}" if cfg.offline.dataset else "drawn from the initial policy"
    print(f"odpo: offline: {sum(len(s.pairs) for s in rounds)} fixed pairs {origin} "
          f"({', '.join(str(len(s.pairs)) for s in rounds)} per round; {drawn} round(s) drawn now), in {fixed.folder}",
          file=sys.stderr)
    return rounds


def draw_round(r: int, cfg: OdpoConfig, source: PromptSource, generators: ActorPool, scorers: ActorPool,
               version: int = 0, ahead: bool = False) -> RoundStream:
    """Round r's prompts through the generators (holding weight `version`) and scorers, paired; nothing
    trained. The pairs come in the order streaming releases them. `ahead`: drawn while the round before
    trains (one-step-off-policy), with a progress line of its own."""
    prompts = source.round_prompts(r)
    why = f"ahead, from weight version {version}, while round {r} trains" if ahead else "from the initial policy"
    print(f"odpo: drawing round {r + 1}/{cfg.run.rounds}'s pairs {why}", file=sys.stderr)
    progress = RoundProgress(r, cfg.run.rounds, len(prompts), cfg.metrics.progress_interval_s,
                             label="(drawn ahead)" if ahead else None)
    stream = stream_round(r, prompts, version, cfg, generators, scorers, None, progress)
    progress.close()
    position = {p.uid: i for i, p in enumerate(prompts)}
    stream.pairs.sort(key=lambda p: position[p.uid])  # the order streaming releases them to the learner online
    return stream


def dataset_rounds(cfg: OdpoConfig, tokenizer) -> list[RoundStream]:
    """The dataset's rows as pairs, tokenised as generated pairs are (the policy's chat template with the
    generation prompt, cut to data.max_prompt_length from the left; a response ends with the EOS token)."""
    from orchestrator.reward_training import load_preferences

    items = load_preferences(cfg.offline.dataset, None, key="offline.dataset")
    per, rounds = cfg.data.prompts_per_round, cfg.run.rounds
    if len(items) < per * rounds:
        raise InputError(f"offline.dataset {cfg.offline.dataset} has {len(items)} pairs; run.rounds x "
                         f"data.prompts_per_round = {rounds} x {per} = {rounds * per} are needed")
    if len(items) > per * rounds:
        print(f"odpo: offline: training on the first {per * rounds} of the {len(items)} pairs in "
              f"{cfg.offline.dataset} (run.rounds x data.prompts_per_round)", file=sys.stderr)
    eos = tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]

    out, cut = [], 0
    for r in range(rounds):
        stream = RoundStream()
        for uid in range(r * per, (r + 1) * per):
            messages, chosen, rejected = items[uid]
            text = render_prompt(tokenizer, messages)
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            cut += len(prompt_ids) > cfg.data.max_prompt_length
            prompt_ids = prompt_ids[-cfg.data.max_prompt_length:]
            stream.pairs.append(Pair(uid=uid, round=r, weight_version=-1, prompt_messages=messages, prompt_text=text,
                                     prompt_ids=prompt_ids, chosen=chosen, rejected=rejected, chosen_ids=ids(chosen),
                                     rejected_ids=ids(rejected), chosen_score=math.nan, rejected_score=math.nan))
            stream.response_chars += [len(chosen), len(rejected)]
        out.append(stream)
    if cut:
        print(f"odpo: offline: {cut} of the dataset's prompts are longer than data.max_prompt_length="
              f"{cfg.data.max_prompt_length} tokens and keep their last ones, as generated prompts do", file=sys.stderr)
    return out


def save_round(path: str, stream: RoundStream) -> None:
    lines = [json.dumps({"stats": {k: getattr(stream, k) for k in SAVED_FIELDS if k != "pairs"}})]
    lines += [json.dumps(dataclasses.asdict(p), ensure_ascii=False) for p in stream.pairs]
    write_atomic(path, "".join(line + "\n" for line in lines))


def load_round(path: str) -> RoundStream:
    with open(path) as f:
        stats = json.loads(f.readline())["stats"]
        pairs = [Pair(**json.loads(line)) for line in f]
    return RoundStream(pairs=pairs, **stats)


def train_round(r: int, fixed: RoundStream, cfg: OdpoConfig, learners, progress: RoundProgress,
                chunks: list[int], train_after: threading.Event | None = None) -> RoundStream:
    """Round r's first epoch over its fixed pairs (in order); a RoundStream as an online round reports it.
    `chunks`: each pair's chunk, as streaming made them (the reference stage's groups, so that the reference
    log-probs are online's to the bit). `train_after`: as stream_round's (the previous round's deferred
    evaluation sends its KL forwards first)."""
    start = time.perf_counter()
    if train_after is not None:
        train_after.wait()
    stream = RoundStream(**{k: getattr(fixed, k) for k in SAVED_FIELDS}, drawn_before_round=True)
    pairs = fixed.pairs
    if cfg.learner.reference_ahead:  # once for every epoch of the round
        pairs, stream.busy["reference"] = learners.with_reference(pairs, chunks)
    stream.steps = replay_epochs(pairs, cfg, r, learners, progress, first=0, last=1)
    stream.pairs = sorted(pairs, key=lambda p: p.uid)  # as a streamed round hands them to the later epochs
    stream.busy["train"] = sum(s.seconds for s in stream.steps)
    stream.learner_flops = sum(s.flops for s in stream.steps)
    stream.wall_s = time.perf_counter() - start
    return stream
