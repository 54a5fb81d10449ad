"""Evaluation on held-out prompts (`eval.prompts`), after every round and by `odpo eval`.

The held-out prompts are the tail of the shuffled dataset, apart from every round's slice and the same
whatever run.rounds (a resumed run may add rounds). They are sampled as
training samples are (n responses each, `generator.temperatures`), with the same seeds every time, so
sample j of a prompt under the current policy faces sample j under the initial policy. The metrics:

    eval/reward_mean     mean scorer reward of the samples (a pairwise scorer gives none: NaN)
    eval/win_rate        share of samples the scorer prefers to the initial policy's (ties count half)
    eval/response_chars  mean response length in characters
    eval/kl              mean of log pi(y|x) - log pi_ref(y|x) over the samples: an estimate of KL(pi || pi_ref)
    eval/gold_mean       mean `eval.gold_reward` (a reward only used to evaluate), if configured
    eval/*_initial       the same for the initial policy, for reference
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import ray

from actors.models import load_tokenizer, quiet_libraries
from actors.scorer import RewardFn
from actors.types import Prompt, RolloutChunk, WeightBundle
from orchestrator.cluster import Cluster
from orchestrator.config import InputError, InputNotFound, OdpoConfig
from orchestrator.data import PromptSource
from orchestrator.outputs import resolve_models
from orchestrator.pools import ActorPool, LearnerGroup
from orchestrator.streaming import make_chunks

EVAL_ROUND = 1_000_000
"""The chunk-seed stream of the eval set: the same every round, apart from any training round's."""


@dataclass
class Samples:
    chunks: list[RolloutChunk]
    rewards: list[float]
    """Scorer rewards, flat in (prompt, sample) order; empty for a pairwise scorer."""

    def items(self) -> list[tuple[list, str]]:
        return [(ro.prompt.messages, r.text) for c in self.chunks for ro in c.rollouts for r in ro.responses]

    def columns(self) -> list[dict]:
        """Each sample's prompt row columns (what a reward function such as a verifier reads), as items()."""
        return [ro.prompt.columns for c in self.chunks for ro in c.rollouts for _ in ro.responses]


def sample(prompts: list[Prompt], cfg: OdpoConfig, generators: ActorPool, scorers: ActorPool,
           version: int) -> Samples:
    """Generate the eval set with the generators' current weights (checked to be `version`) and score it."""
    chunks = make_chunks(EVAL_ROUND, prompts, cfg.generator.chunk_size, cfg.run.seed)
    gens, scs = generators.actors, scorers.actors
    out: list[RolloutChunk] = generators.get([gens[i % len(gens)].generate.remote(c) for i, c in enumerate(chunks)],
                                             "generating the evaluation set")
    stale = [c.chunk_id for c in out if c.weight_version != version]
    if stale:
        raise RuntimeError(f"evaluation chunks {stale} were generated with another weight version than {version}")
    rewards: list[float] = []
    if cfg.scorer.type != "pairwise":
        scored = scorers.get([scs[i % len(scs)].score.remote(c) for i, c in enumerate(out)], "scoring the evaluation set")
        rewards = [x for sc in scored for row in sc.scores for x in row]
    return Samples(out, rewards)


def metrics(now: Samples, initial: Samples, cfg: OdpoConfig, scorers: ActorPool,
            learners: LearnerGroup | None) -> dict:
    items, base = now.items(), initial.items()
    scs = scorers.actors
    per = math.ceil(len(items) / len(scs))
    triples = [(m, a, b) for (m, a), (_, b) in zip(items, base)]
    columns = now.columns()
    probs = [p for part in scorers.get([scs[k].compare.remote(triples[k * per: (k + 1) * per],
                                                              columns[k * per: (k + 1) * per]) for k in range(len(scs))],
                                       "judging the evaluation set") for p in part]
    out = {
        "eval/prompts": len({ro.prompt.uid for c in now.chunks for ro in c.rollouts}),
        "eval/reward_mean": float(np.mean(now.rewards)) if now.rewards else float("nan"),
        "eval/reward_initial": float(np.mean(initial.rewards)) if initial.rewards else float("nan"),
        "eval/win_rate": float(np.mean([1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in probs])),
        "eval/response_chars": float(np.mean([len(t) for _, t in items])),
        "eval/response_chars_initial": float(np.mean([len(t) for _, t in base])),
        "eval/kl": kl_estimate(now, learners) if learners is not None else float("nan"),
    }
    if cfg.eval.gold_reward:
        gold = RewardFn(cfg.eval.gold_reward)
        out["eval/gold_mean"] = float(np.mean([gold(m, t, c) for (m, t), c in zip(items, columns)]))
        out["eval/gold_initial"] = float(np.mean([gold(m, t, c) for (m, t), c in zip(base, initial.columns())]))
    return out


def kl_estimate(samples: Samples, learners: LearnerGroup) -> float:
    prompts = [ro.prompt_ids for c in samples.chunks for ro in c.rollouts for _ in ro.responses]
    responses = [r.token_ids for c in samples.chunks for ro in c.rollouts for r in ro.responses]
    ratios = learners.get([r.log_ratios.remote(prompts, responses) for r in learners.ranks], "the KL estimate")[0]
    return float(np.mean(ratios))


def summary(m: dict) -> str:
    parts = [f"win rate vs initial {m['eval/win_rate']:.3f}", f"KL {m['eval/kl']:.3f}",
             f"chars {m['eval/response_chars']:.1f}"]
    if not math.isnan(m["eval/reward_mean"]):
        parts.insert(0, f"reward {m['eval/reward_mean']:.4f} (initial {m['eval/reward_initial']:.4f})")
    if "eval/gold_mean" in m:
        parts.insert(1, f"gold {m['eval/gold_mean']:.4f} (initial {m['eval/gold_initial']:.4f})")
    return "eval: " + ", ".join(parts)


def report(m: dict, label: str) -> None:
    print(f"odpo: {label} {summary(m)}", file=sys.stderr)


def evaluate_checkpoint(checkpoint: str, cfg: OdpoConfig) -> dict:
    """`odpo eval CHECKPOINT CONFIG`: the held-out metrics of a saved policy against the config's initial
    policy (the reference), as the run reports them after the round that saved it. Also written to
    CHECKPOINT/eval.json."""
    quiet_libraries()
    weights = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(weights):
        raise InputNotFound(f"{checkpoint} is not a checkpoint (no model.safetensors)")
    if cfg.eval.prompts < 1:
        raise InputError("eval.prompts must be >= 1 for odpo eval (the held-out prompts to answer)")
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    policy, tokenizer_path, reward = resolve_models(cfg, run_dir, build=False)  # builtins: the run's own
    tokenizer = load_tokenizer(tokenizer_path, cfg.policy.trust_remote_code)
    source = PromptSource(cfg.data, cfg.run.seed, cfg.run.rounds, cfg.eval.prompts)
    source.check_lengths(tokenizer, cfg.data)
    with Cluster(cfg) as cluster:
        generators, scorers = cluster.generators(policy, tokenizer_path), cluster.scorers(reward)
        learners = cluster.learners(checkpoint, policy, tokenizer.pad_token_id)  # the KL's reference: the initial policy
        initial = sample(source.eval, cfg, generators, scorers, 0)
        with open(weights, "rb") as f:
            generators.weights_ref = ray.put(WeightBundle(version=1, payload=f.read()))
        generators.get([a.load_weights.remote(generators.weights_ref) for a in generators.actors], "loading the checkpoint")
        result = metrics(sample(source.eval, cfg, generators, scorers, 1), initial, cfg, scorers, learners)
    with open(os.path.join(checkpoint, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    report(result, checkpoint)
    return result
