"""`odpo train-rm CONFIG`: train a Bradley-Terry reward model on preference pairs with the same Ray
learner group and DeepSpeed machinery as the DPO loop (`RewardLearner`: loss -log sigmoid(r_chosen -
r_rejected), the `learner` section's lr, warmup + cosine schedule, batch sizes, ZeRO stage and ranks).

Pairs come from a dataset (`prompt`, `chosen`, `rejected`; strings or chat message lists), or are labelled
by a rule: responses made in code for the tiny workflow (`builtin:lowercase-pairs`), or the initial policy's
own samples on `reward_training.prompts` (`builtin:policy-samples`: the paper's workflow, with a verifier
standing in for human labels; the best and the worst of each prompt's n samples form a pair). A seeded share is
held out; pairwise accuracy on it is reported before training and after every epoch. The result is a
Hugging Face sequence classifier in `<run dir>/reward_model/`, which `scorer.type=reward_model` loads.

With reward_training.type=pairwise it is instead a pairwise preference model in RLHFlow's format
(actors/preference.py; `PairwiseLearner`): a causal LM trained with the next-token loss on the letter (A or B)
of the better response, each training pair shown in a seeded random order, the held-out pairs judged in both
orders (P(A) averaged, as the scorer judges); `scorer.type=pairwise` loads it.

    <output_dir>/<name>/metrics.jsonl        one line per epoch (epoch -1: before training)
    <output_dir>/<name>/reward_model/        config.json, model.safetensors, tokenizer files
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable

import numpy as np

from actors.learner import PairwiseLearner, RewardLearner
from actors.models import first_layers, is_builtin, load_tokenizer, materialize_builtin
from actors.preference import PreferenceFormat
from actors.rewards import lowercase_ratio
from actors.settings import LoraSettings
from actors.types import Messages, Pair
from actors.user_code import RewardFn
from actors.worker import quiet_libraries
from orchestrator.cluster import Cluster
from orchestrator.config import InputError, OdpoConfig, OutputExists, RewardTrainingConfig
from orchestrator.outputs import RunDir, write_atomic
from orchestrator.pools import ActorPool, LearnerGroup, combine_step

POLICY_SAMPLES = "builtin:policy-samples"
RM_SAMPLE_ROUND = 2_000_000
"""The chunk-seed stream of the reward model's policy samples, apart from every round's and the eval set's."""

LATER_KEYS = ("prompts", "lr", "dtype", "base_layers", "type")
"""reward_training keys newer than the first saved records (see training_record)."""

RECORD_FILE = "odpo_reward_training.json"
"""Saved beside the model: the settings it was trained with (training_record)."""

LOWERCASE_PROMPTS = ("Tell me about item {}.", "Describe thing number {}.", "What is {}?", "Write about {}.")


def rule_pairs(count: int, seed: int, rule: Callable[..., float] = lowercase_ratio
               ) -> list[tuple[Messages, str, str]]:
    """Preference pairs labelled by a rule (default: the lowercase ratio): byte strings like a random
    byte-level policy writes, each with its own share of lowercase letters (uniform over 0..1, so every
    share is covered); the response the rule rewards more is chosen (ties are not kept)."""
    rng = random.Random(seed)

    def response() -> str:
        share, length = rng.random(), rng.randint(4, 32)
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") if rng.random() < share
                       else rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!?#.,") for _ in range(length))

    out = []
    while len(out) < count:
        a, b = response(), response()
        messages = [{"role": "user", "content": rng.choice(LOWERCASE_PROMPTS).format(len(out))}]
        ra, rb = rule(messages, a), rule(messages, b)
        if ra != rb:
            out.append((messages, a, b) if ra > rb else (messages, b, a))
    return out


def rule_function(cfg: OdpoConfig) -> RewardFn:
    """reward_training.rule, called as every user function is (errors per scorer.function_errors)."""
    return RewardFn(cfg.reward_training.rule, cfg.scorer.function_errors, cfg.scorer.failure_score,
                    "reward_training.rule")


def policy_sample_pairs(cfg: OdpoConfig, generators: ActorPool) -> tuple[list[tuple[Messages, str, str]], dict]:
    """The initial policy's n samples for each of `reward_training.prompts`' first num_pairs prompts, scored
    by `reward_training.rule` (which reads the prompt row's columns, e.g. the answer); the best and the worst
    sample of a prompt form its pair, as pairs.strategy=max_min does in the loop. A prompt whose samples all
    score the same is sampled n more times, up to generator.resample_ties times, as in the loop; one still
    tied gives no pair (counted). Returns the pairs and what the sampling found (`data/*`, for the reward
    model's metrics)."""
    from orchestrator.data import load_prompts
    from orchestrator.selection import make_pairs
    from orchestrator.streaming import Resampler, make_chunks

    rt = cfg.reward_training
    prompts = load_prompts(rt.prompts, cfg.data, "reward_training.prompts", rt.num_pairs)
    rule = rule_function(cfg)
    start = time.perf_counter()
    gens = generators.actors
    resampler = Resampler(cfg.generator.resample_ties)
    pairs, drops, flat, tokens, draws, again_total = [], {}, [], 0, 0, 0
    chunks = make_chunks(RM_SAMPLE_ROUND, prompts, cfg.generator.chunk_size, cfg.run.seed)
    next_id = len(chunks)
    while chunks:
        print(f"odpo: reward model data: sampling {sum(len(c.prompts) for c in chunks)} prompts x {cfg.generator.n} "
              f"from the initial policy" + (f" (draw {draws + 1}: their samples so far all tie)" if draws else ""),
              file=sys.stderr)
        out = generators.get([gens[i % len(gens)].generate.remote(c) for i, c in enumerate(chunks)],
                             "sampling the reward model's training data")
        rollouts = [ro for c in out for ro in c.rollouts]
        scores = [[rule(ro.prompt.messages, r.text, ro.prompt.columns) for r in ro.responses] for ro in rollouts]
        flat += [x for row in scores for x in row]
        tokens += sum(c.new_tokens for c in out)
        rollouts, scores = resampler.merge(rollouts, scores)
        found, dropped = make_pairs(rollouts, scores, "max_min", 0.0, cfg.run.seed, RM_SAMPLE_ROUND,
                                    hold=resampler.hold)
        pairs += found
        drops = {k: drops.get(k, 0) + v for k, v in dropped.items()}
        again = resampler.take_again()
        again_total += len(again)
        chunks = make_chunks(RM_SAMPLE_ROUND, again, cfg.generator.chunk_size, cfg.run.seed, next_id)
        next_id += len(chunks)
        draws += 1
    print(f"odpo: reward model data: {len(pairs)} pairs from {len(prompts)} prompts (dropped: "
          f"{', '.join(f'{k} {v}' for k, v in drops.items())}); rule mean {np.mean(flat):.3f} over {len(flat)} "
          f"samples; {tokens} tokens in {time.perf_counter() - start:.0f}s"
          + (f"; {again_total} tied prompt draws sampled again" if again_total else ""), file=sys.stderr)
    info = {"data/prompts": len(prompts), "data/pairs": len(pairs), "data/resampled_prompts": again_total,
            "data/rule_mean": float(np.mean(flat)), "data/tokens": tokens,
            **{f"data/drop_{k}": v for k, v in drops.items()}}
    return [(p.prompt_messages, p.chosen, p.rejected) for p in pairs], info


def _as_messages(prompt) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _response_text(value, where: str) -> tuple[Messages | None, str]:
    """A response given as a string, or as a chat whose last turn is the assistant's (and whose earlier
    turns, if any, are the prompt)."""
    if isinstance(value, str):
        return None, value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        return (list(value[:-1]) or None), str(value[-1].get("content", ""))
    raise InputError(f"{where}: a response is a string or a chat list ending with an assistant turn")


def load_preferences(path: str, limit: int | None, key: str = "reward_training.data_path"
                     ) -> list[tuple[Messages, str, str]]:
    from orchestrator.data import load_dataset_any

    rows = load_dataset_any(path, "train")
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ("chosen", "rejected") if k not in row]
        if missing:
            raise InputError(f"{key} row {i}: no {missing[0]!r} column (have {sorted(row)})")
        chosen_ctx, chosen = _response_text(row["chosen"], f"{key} row {i} chosen")
        _, rejected = _response_text(row["rejected"], f"{key} row {i} rejected")
        prompt = row.get("prompt") or chosen_ctx
        if not prompt:
            raise InputError(f"{key} row {i}: no prompt (a `prompt` column, or chat lists)")
        out.append((_as_messages(prompt), chosen, rejected))
        if limit is not None and len(out) >= limit:
            break
    return out


def to_pairs(items: list[tuple[Messages, str, str]], tokenizer, max_length: int) -> list[Pair]:
    """Whole sequences (prompt + response in the reward model's chat template, last `max_length` tokens),
    exactly what the scorer feeds the model."""
    def ids(messages: Messages, response: str) -> list[int]:
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:]

    return [Pair(uid=i, round=0, weight_version=0, prompt_messages=m, prompt_text="", prompt_ids=[], chosen=c,
                 rejected=r, chosen_ids=ids(m, c), rejected_ids=ids(m, r), chosen_score=1.0, rejected_score=0.0)
            for i, (m, c, r) in enumerate(items)]


def preference_pairs(items: list[tuple[Messages, str, str]], fmt: PreferenceFormat, max_length: int,
                     orders: str, seed: int) -> list[Pair]:
    """RLHFlow's pairwise format (`PairwiseLearner`): the input holding both responses as `prompt_ids`, the
    right letter's token id as `chosen_ids`, the other's as `rejected_ids`. `orders="random"`: each
    preference once, chosen as A or as B by a seeded coin (training, as RLHFlow trained theirs); `"both"`: each
    in both orders under one uid (the held-out evaluation, which judges both as the scorer does)."""
    coin = np.random.default_rng([seed, 11]).random(len(items)) < 0.5
    out = []
    for i, (m, c, r) in enumerate(items):
        for chosen_first in ((True, False) if orders == "both" else (bool(coin[i]),)):
            a, b = (c, r) if chosen_first else (r, c)
            right, wrong = (fmt.id_a, fmt.id_b) if chosen_first else (fmt.id_b, fmt.id_a)
            out.append(Pair(uid=i, round=0, weight_version=0, prompt_messages=m, prompt_text="",
                            prompt_ids=fmt.ids(m, a, b, max_length), chosen=c, rejected=r, chosen_ids=[right],
                            rejected_ids=[wrong], chosen_score=1.0, rejected_score=0.0))
    return out


def training_record(cfg: OdpoConfig) -> dict:
    """What defines a trained reward model: its data and base (the reward_training section) and the seed."""
    section, defaults = dataclasses.asdict(cfg.reward_training), dataclasses.asdict(RewardTrainingConfig())
    # keys added after records were first written count only when set, so a run made before them still resumes
    section = {k: v for k, v in section.items() if k not in LATER_KEYS or v != defaults[k]}
    record = {"reward_training": section, "run.seed": cfg.run.seed}
    if cfg.reward_training.data_path == POLICY_SAMPLES and cfg.generator.resample_ties:  # it draws the data too
        record["generator.resample_ties"] = cfg.generator.resample_ties
    return record


def train_reward_model(cfg: OdpoConfig) -> str:
    """`odpo train-rm`: a run directory of its own; returns the saved reward model's directory."""
    run_dir = os.path.abspath(os.path.join(cfg.run.output_dir, cfg.run.name))
    if os.path.exists(run_dir):
        if not cfg.run.overwrite:
            raise OutputExists(f"{run_dir} exists; set run.overwrite=true or choose another run.name")
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    return fit_reward_model(cfg, os.path.join(run_dir, "reward_model"), os.path.join(run_dir, "metrics.jsonl"),
                            os.path.join(run_dir, "base_model"))


def fit_reward_model(cfg: OdpoConfig, dest: str, metrics_path: str, base_dir: str, policy_path: str | None = None,
                     generators: ActorPool | None = None, cluster: Cluster | None = None) -> str:
    """Train, evaluate each epoch, save to `dest` (whole or not at all); on the run's `cluster` when given (the
    driver trains its reward model first this way: the reward model's learner takes the DPO learner's place,
    colocated bundles included, and leaves it when trained), else on a cluster of its own. With
    builtin:policy-samples, the initial policy's samples come from `generators` (the run's pool, holding the
    initial weights), or from a pool of its own on `policy_path` (default: policy.path)."""
    quiet_libraries()
    rt, lc = cfg.reward_training, cfg.learner
    pairwise = rt.type == "pairwise"
    base = rt.base_model
    if is_builtin(base):
        base = materialize_builtin(base, base_dir, cfg.run.seed + 1)
    if rt.base_layers is not None:
        base = first_layers(base, rt.base_layers, f"{base_dir}-first-{rt.base_layers}-layers")
    tokenizer = load_tokenizer(base)
    tokenizer.truncation_side = "left"
    data_info = {}
    with contextlib.ExitStack() as stack:
        cluster = cluster or stack.enter_context(Cluster(cfg))
        if rt.data_path == POLICY_SAMPLES:
            own = None
            if generators is None:
                policy = policy_path or cfg.policy.path
                if is_builtin(policy):
                    policy = materialize_builtin(policy, os.path.join(os.path.dirname(base_dir), "policy"), cfg.run.seed)
                generators = own = cluster.generators(policy, cfg.policy.tokenizer or policy)
            items, data_info = policy_sample_pairs(cfg, generators)
            if own is not None:  # the sampling pool's CPUs go to the reward model's training
                cluster.remove(own)
        elif rt.data_path.startswith("builtin:"):
            items = rule_pairs(rt.num_pairs or 2048, cfg.run.seed, rule_function(cfg))
        else:
            items = load_preferences(rt.data_path, rt.num_pairs)
        if len(items) < 4:
            raise InputError(f"reward_training: only {len(items)} preference pairs to train on (at least 4 needed)")
        order = np.random.default_rng([cfg.run.seed, 7]).permutation(len(items))
        held = max(1, int(round(rt.eval_fraction * len(items))))
        held_items, train_items = [items[i] for i in order[:held]], [items[i] for i in order[held:]]
        if pairwise:
            fmt = PreferenceFormat(tokenizer, cfg.scorer.pairwise_generation_prompt)
            held_out = preference_pairs(held_items, fmt, rt.max_length, "both", cfg.run.seed)
            train = preference_pairs(train_items, fmt, rt.max_length, "random", cfg.run.seed)
        else:
            held_out, train = to_pairs(held_items, tokenizer, rt.max_length), to_pairs(train_items, tokenizer, rt.max_length)
        name = "pairwise model" if pairwise else "reward model"
        print(f"odpo: {name} from {rt.base_model}{' (RLHFlow A/B format)' if pairwise else ''}: {len(train)} training pairs, {len(held_items)} held out",
              file=sys.stderr)
        # the reward model trains whole: learner.lora's adapters are the policy's
        rm_learner = cluster.threads_of("learner", dataclasses.replace(lc, lr=rt.lr if rt.lr is not None else lc.lr,
                                                                       lora=LoraSettings()))
        group = cluster.learner_group("rm-learner", PairwiseLearner if pairwise else RewardLearner,
                                      lambda r: (rm_learner, base, rt.dtype, r, lc.num_ranks, tokenizer.pad_token_id))
        stack.callback(cluster.remove, group.pool)  # its cores go to the run's pools once it is saved
        history = [evaluate(group, held_out, -1, 0, float("nan"), 0.0, name) | data_info]
        g = lc.global_batch_size
        steps_per_epoch = math.ceil(len(train) / g)
        group.start_round(0, steps_per_epoch * rt.epochs)  # one warmup + cosine over the whole training
        for epoch in range(rt.epochs):
            start = time.perf_counter()
            shuffled = [train[i] for i in np.random.default_rng([cfg.run.seed, epoch]).permutation(len(train))]
            steps = [combine_step(group.get(group.async_train_step_refs(shuffled[s: s + g]), "a training step"))
                     for s in range(0, len(shuffled), g)]
            seen = sum(s.pairs for s in steps)
            train_loss = sum(s.loss * s.pairs for s in steps) / seen
            history.append(evaluate(group, held_out, epoch, len(steps), train_loss, time.perf_counter() - start, name))
        write_atomic(metrics_path, "".join(f"{_json(m)}\n" for m in history))
        bundle = group.get(group.async_export_refs(1), "the weight export")[0]
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base)
        config.pad_token_id = tokenizer.pad_token_id
        if pairwise:  # stays a causal LM: the scorer reads its next-token logits of A and B
            config.architectures = [a.replace("ForSequenceClassification", "ForCausalLM")
                                    for a in config.architectures or []]
        else:  # a causal LM base (e.g. builtin:smollm2-135m-instruct) becomes a sequence classifier
            config.num_labels = 1
            config.architectures = [a.replace("ForCausalLM", "ForSequenceClassification")
                                    for a in config.architectures or []]
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            f.write(bundle.payload)
        write_atomic(os.path.join(tmp, RECORD_FILE), _json(training_record(cfg)))
        os.replace(tmp, dest)
        print(f"odpo: {name} saved to {dest} (held-out accuracy {history[0]['eval/accuracy']:.3f} -> "
              f"{history[-1]['eval/accuracy']:.3f}; scorer.type={rt.type} scorer.model_path={dest})", file=sys.stderr)
        return dest


def train_own_reward_model(cfg: OdpoConfig, out: RunDir, path: str, generators: ActorPool | None = None,
                           cluster: Cluster | None = None) -> None:
    """scorer.model_path=reward_training: train the reward model once per run directory. One trained with
    other reward_training settings is trained again while no round has used it; after that, a resume with
    other settings is refused."""
    if out.made_with(path, RECORD_FILE, training_record(cfg), "reward model"):
        print(f"odpo: using the reward model this run trained, {path}", file=sys.stderr)
    else:
        fit_reward_model(cfg, path, out.sub("reward_model_metrics.jsonl"), out.sub("base_models", "reward"),
                         generators=generators, cluster=cluster)


def evaluate(group: LearnerGroup, held_out: list[Pair], epoch: int, steps: int, train_loss: float,
             seconds: float, name: str = "reward model") -> dict:
    """Held-out pairwise accuracy (every rank runs the whole set: ZeRO-3 forwards are collective)."""
    result = group.get([r.evaluate.remote(held_out) for r in group.ranks], "the held-out evaluation")[0]
    m = {"epoch": epoch, "steps": steps, "train/loss": train_loss, "eval/accuracy": result["correct"] / result["pairs"],
         "eval/loss": result["loss"] / result["pairs"], "eval/pairs": result["pairs"], "timing/epoch": seconds}
    label = "before training" if epoch < 0 else f"epoch {epoch + 1}"
    print(f"odpo: {name} {label}: held-out accuracy {m['eval/accuracy']:.3f}, loss {m['eval/loss']:.4f}"
          + ("" if epoch < 0 else f", train loss {train_loss:.4f}, {steps} steps, {seconds:.1f}s"), file=sys.stderr)
    return m


def _json(m: dict) -> str:
    import json

    return json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()})
