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
    eval/rare_tokens     the fluency figure: the share of response tokens the reference policy (the initial one)
                         gives less than 1e-4, i.e. would almost never write: made-up words and odd symbols that
                         satisfy a reward raise it; a change of format (bare answers) does not. Compare
                         eval/rare_tokens_initial, that of the initial policy's own samples
    eval/nll             the reference's mean per-token negative log-likelihood of the samples (shorter, blunter
                         answers move it too, so it is shown beside the rare-token share, not instead)
    eval/*_initial       the same for the initial policy, for reference
    eval/*_ci95          the half-width of the figure's 95% interval, with the prompt as the unit
                         (orchestrator/stats.py: a sample's n responses to one prompt are not independent)
    eval/*_change        the change from the initial policy, paired by prompt and sample, with its own *_ci95
    eval/samples         the samples every figure is a mean over (eval/prompts x n)
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray

from actors.models import load_tokenizer
from actors.types import Prompt, RolloutChunk
from actors.user_code import RewardFn, UserFunctionError
from actors.worker import quiet_libraries
from orchestrator import chaos, stats
from orchestrator.cluster import Cluster
from orchestrator.config import InputError, OdpoConfig, syncs_adapters
from orchestrator.data import PromptSource
from orchestrator.outputs import read_checkpoint_weights, resolve_models
from orchestrator.pools import ActorPool, LearnerGroup
from orchestrator.streaming import make_chunks, map_calls

EVAL_ROUND = 1_000_000
"""The chunk-seed stream of the eval set: the same every round, apart from any training round's."""


@dataclass
class Samples:
    chunks: list[RolloutChunk]
    rewards: list[float]
    """Scorer rewards, flat in (prompt, sample) order; empty for a pairwise scorer."""
    busy: dict[str, float] = field(default_factory=dict)
    """Seconds the pools computed for these samples, summed over actors (`generate`, `score`)."""
    ref_nll: list[float] = field(default_factory=list)
    """The reference policy's per-token NLL of each sample (filled once the learner has computed it)."""
    ref_rare: list[float] = field(default_factory=list)
    """Each sample's share of tokens the reference gives less than 1e-4 (filled with ref_nll)."""

    def items(self) -> list[tuple[list, str]]:
        return [(ro.prompt.messages, r.text) for c in self.chunks for ro in c.rollouts for r in ro.responses]

    def prompt_ids(self) -> list[int]:
        """Each sample's prompt uid, as items(): the unit of every interval."""
        return [ro.prompt.uid for c in self.chunks for ro in c.rollouts for _ in ro.responses]

    def columns(self) -> list[dict]:
        """Each sample's prompt row columns (what a reward function such as a verifier reads), as items()."""
        return [ro.prompt.columns for c in self.chunks for ro in c.rollouts for _ in ro.responses]


def sample(prompts: list[Prompt], cfg: OdpoConfig, generators: ActorPool, scorers: ActorPool,
           version: int, kl: KL | None = None) -> Samples:
    """Generate the eval set with the generators' current weights (checked to be `version`) and score it; with
    `kl`, each chunk's KL is asked of the learner as the chunk comes back."""
    return score(generate(prompts, cfg, generators, version, on_chunk=kl and kl.on_chunk), cfg, scorers)


def generate(prompts: list[Prompt], cfg: OdpoConfig, generators: ActorPool, version: int,
             sent: threading.Event | None = None,
             on_chunk: Callable[[int, RolloutChunk], None] | None = None) -> list[RolloutChunk]:
    """The eval set's chunks, generated with weights `version` (checked); `sent` is set once every chunk is
    queued at the generators; `on_chunk(i, chunk)` is called as chunk i comes back (checked)."""
    chunks = make_chunks(EVAL_ROUND, prompts, cfg.generator.chunk_size, cfg.run.seed)

    def all_sent() -> None:
        if sent is not None:
            sent.set()
        chaos.point("eval", version - 1)  # the round whose weights these are

    def check(i: int, chunk: RolloutChunk) -> None:
        if chunk.weight_version != version:
            raise RuntimeError(f"evaluation chunk {chunk.chunk_id} was generated with weight version "
                               f"{chunk.weight_version}, not {version}")
        if on_chunk is not None:
            on_chunk(i, chunk)

    # a generator that dies or hangs is replaced and its chunks are redone (same seeds: the same samples)
    return map_calls(generators, lambda a, c: a.generate.remote(c), chunks, "generating the evaluation set",
                     on_sent=all_sent, on_result=check, turn_timeout_s=cfg.learner.step_timeout_s)


def score(out: list[RolloutChunk], cfg: OdpoConfig, scorers: ActorPool) -> Samples:
    rewards: list[float] = []
    busy = {"generate": sum(c.seconds for c in out), "score": 0.0}
    if cfg.scorer.type != "pairwise":
        scored = map_calls(scorers, lambda a, c: a.score.remote(c), out, "scoring the evaluation set",
                           turn_timeout_s=cfg.learner.step_timeout_s)
        rewards = [x for sc in scored for row in sc.scores for x in row]
        busy["score"] = sum(sc.seconds for sc in scored)
    return Samples(out, rewards, busy)


def metrics(now: Samples, initial: Samples, cfg: OdpoConfig, scorers: ActorPool,
            learners: LearnerGroup | None, kl: KL | None = None) -> dict:
    """`kl`: the learner's log-ratios of `now`, already asked for (else asked here, of the whole set at once)."""
    items, base = now.items(), initial.items()
    size = len(scorers)
    per = math.ceil(len(items) / size)
    triples = [(m, a, b) for (m, a), (_, b) in zip(items, base)]
    columns = now.columns()
    shares = [(triples[k * per: (k + 1) * per], columns[k * per: (k + 1) * per]) for k in range(size)]
    start = time.perf_counter()
    probs = [p for part in map_calls(scorers, lambda a, share: a.compare.remote(*share), shares,
                                     "judging the evaluation set", turn_timeout_s=cfg.learner.step_timeout_s)
             for p in part]
    judge_s = time.perf_counter() - start  # every scorer judges its share at once
    kl_value, kl_s, ratios, kl_parts = float("nan"), 0.0, [], 0
    if learners is not None:
        if kl is None:
            kl = KL(learners)
            kl.ask(now.chunks)
        ratios, now.ref_nll, now.ref_rare, kl_s = kl.join("the KL estimate")
        kl_value, kl_parts = float(np.mean(ratios)), len(kl.parts)
    groups = now.prompt_ids()
    out = {
        "eval/prompts": len(set(groups)), "eval/samples": len(items),
        "eval/win_rate": float(np.mean([1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in probs])),
        "eval/response_chars": float(np.mean([len(t) for _, t in items])),
        "eval/response_chars_initial": float(np.mean([len(t) for _, t in base])),
        "eval/kl": kl_value, "eval/kl_ci95": stats.clustered(ratios, groups)[1] if ratios else float("nan"),
        "profile/eval_kl_parts": kl_parts,  # the calls it was asked in: one per chunk when asked as the chunks came
        # what the evaluation cost each pool, summed over its actors (the round's profile adds them up)
        "timing/eval_generate": now.busy.get("generate", float("nan")), "timing/eval_score": now.busy.get("score", float("nan")),
        "timing/eval_judge": judge_s * size, "timing/eval_kl": kl_s,  # the KL: the learner ranks' compute
    }
    out |= figure("reward", now.rewards, initial.rewards, groups)
    if cfg.eval.gold_reward:
        gold = RewardFn(cfg.eval.gold_reward, cfg.scorer.function_errors, cfg.scorer.failure_score, "eval.gold_reward")
        out |= figure("gold", [gold(m, t, c) for (m, t), c in zip(items, columns)],
                      [gold(m, t, c) for (m, t), c in zip(base, initial.columns())], groups)
        out["eval/gold_errors"] = gold.take_failures()
    for key, now_values, initial_values in (("nll", now.ref_nll, initial.ref_nll),
                                            ("rare_tokens", now.ref_rare, initial.ref_rare)):
        if now_values:
            out[f"eval/{key}"], out[f"eval/{key}_ci95"] = stats.clustered(now_values, groups)
            if initial_values:
                out[f"eval/{key}_initial"], out[f"eval/{key}_initial_ci95"] = stats.clustered(initial_values, groups)
    return out


def figure(name: str, now: list[float], initial: list[float], groups: list[int]) -> dict:
    """`eval/{name}_mean` and `_initial` with their 95% half-widths, and the paired change; NaN where the
    scorer gives no values (a pairwise judge has no reward). The reward figure keeps its historical key
    `eval/reward_mean`."""
    if not now or not initial:
        nan = float("nan")
        return {f"eval/{name}_mean": nan, f"eval/{name}_initial": nan}
    mean, half = stats.clustered(now, groups)
    first, first_half = stats.clustered(initial, groups)
    change, change_half = stats.paired_change(now, initial, groups)
    return {f"eval/{name}_mean": mean, f"eval/{name}_ci95": half, f"eval/{name}_initial": first,
            f"eval/{name}_initial_ci95": first_half, f"eval/{name}_change": change,
            f"eval/{name}_change_ci95": change_half}


class KL:
    """log pi - log pi_ref of an evaluation set's samples (with the reference's NLL and rare-token shares), asked
    of the learner in parts: chunk by chunk as the generators return them (`on_chunk`: the learner computes
    while the generators go on to the next chunks), or the whole set at once (`ask`). Of every rank (ZeRO-3's
    forwards are collective), or of rank 0 alone with `frozen` (on the copy of the policy it froze at the last
    export) or without the `policy` (the reference's NLL only)."""

    def __init__(self, learners: LearnerGroup, policy: bool = True, frozen: bool = False):
        self.learners, self.policy, self.frozen = learners, policy, frozen
        self.parts: dict[int, list[ray.ObjectRef]] = {}
        """Part index -> one answer per rank asked, in the set's order."""

    def on_chunk(self, i: int, chunk: RolloutChunk) -> None:
        self.parts[i] = kl_requests([chunk], self.learners, self.policy, self.frozen)

    def ask(self, chunks: list[RolloutChunk]) -> None:
        self.parts = {0: kl_requests(chunks, self.learners, self.policy, self.frozen)}

    def join(self, what: str) -> tuple[list[float], list[float], list[float], float]:
        """Every sample's log-ratio, reference NLL and rare-token share in the set's order, and the learner's
        seconds (each part's slowest rank's, summed: the parts ran one after another)."""
        order = sorted(self.parts)
        width = len(self.parts[order[0]])
        got = self.learners.get([ref for i in order for ref in self.parts[i]], what)
        answers = [got[k * width] for k in range(len(order))]  # the ranks' lists are the same
        seconds = sum(max(g["seconds"] for g in got[k * width:(k + 1) * width]) for k in range(len(order)))
        return ([x for a in answers for x in a["ratios"]], [x for a in answers for x in a["ref_nll"]],
                [x for a in answers for x in a["ref_rare"]], seconds)


def reference_nll(samples: Samples, learners: LearnerGroup) -> None:
    """The reference's per-token NLL of `samples` (the initial policy's answers, once at start-up)."""
    kl = KL(learners, policy=False)
    kl.ask(samples.chunks)
    _, samples.ref_nll, samples.ref_rare, _ = kl.join("the initial samples' fluency")


def kl_requests(chunks: list[RolloutChunk], learners: LearnerGroup, policy: bool = True,
                frozen: bool = False) -> list[ray.ObjectRef]:
    """log pi - log pi_ref of every sample, asked of every rank (ZeRO-3's forwards are collective), or of rank 0
    alone with `frozen` (on the copy of the policy it froze at the last export) or without the `policy`."""
    prompts = [ro.prompt_ids for c in chunks for ro in c.rollouts for _ in ro.responses]
    responses = [r.token_ids for c in chunks for ro in c.rollouts for r in ro.responses]
    ranks = learners.ranks[:1] if frozen or not policy else learners.ranks  # the reference: never partitioned
    return [r.log_ratios.remote(prompts, responses, policy, frozen) for r in ranks]


class Initial:
    """The initial policy's answers to the held-out prompts (the baseline of every change figure) and the
    reference's NLL of them (the fluency figure's baseline). A fresh run takes them during its round 0
    (`background`), on the weights round 0 samples with: their chunks are queued ahead of round 0's, each
    chunk's NLL goes to learner rank 0 as the chunk comes, and the start-up does not wait for them. A resumed
    run takes them at once, before it loads later weights. `result()` joins."""

    def __init__(self, prompts: list[Prompt], cfg: OdpoConfig, generators: ActorPool, scorers: ActorPool,
                 learners: LearnerGroup, background: bool):
        self.samples: Samples | None = None
        self.outcome: Samples | BaseException | None = None
        self.accounted = not background
        """Whether its pool seconds are counted (a background one's, in the profile of the round it ran in)."""
        self.thread: threading.Thread | None = None
        sent = threading.Event()
        args = (prompts, cfg, generators, scorers, learners, sent)
        if background:
            self.thread = threading.Thread(target=self._run, args=args, daemon=True, name="odpo-eval-initial")
            self.thread.start()
            sent.wait()  # queued ahead of round 0's chunks
        else:
            self._run(*args)

    def _run(self, prompts: list[Prompt], cfg: OdpoConfig, generators: ActorPool, scorers: ActorPool,
             learners: LearnerGroup, sent: threading.Event) -> None:
        try:
            kl = KL(learners, policy=False)
            self.samples = score(generate(prompts, cfg, generators, 0, sent=sent, on_chunk=kl.on_chunk), cfg, scorers)
            _, self.samples.ref_nll, self.samples.ref_rare, self.samples.busy["nll"] = kl.join(
                "the initial samples' fluency")
            self.outcome = self.samples
        except BaseException as e:  # handed to the driver by result()
            self.outcome = e
        finally:
            sent.set()

    def redo_nll(self, learners: LearnerGroup) -> None:
        """The learner group died while the NLL was pending: compute it on the new group."""
        if self.thread is not None:
            self.thread.join()
        from orchestrator.pools import LearnerFailure

        if isinstance(self.outcome, LearnerFailure) and self.samples is not None:
            reference_nll(self.samples, learners)
            self.outcome = self.samples

    def result(self) -> Samples:
        if self.thread is not None:
            self.thread.join()
        if isinstance(self.outcome, UserFunctionError):  # the user's function: its own one line, not wrapped
            raise self.outcome
        if isinstance(self.outcome, BaseException):
            raise RuntimeError(f"the initial policy's evaluation failed: {self.outcome}") from self.outcome
        return self.outcome


class Deferred:
    """Round r's held-out evaluation, run by a driver thread while round r+1 goes on (`eval.overlap`).

    The generators hold round r's weights until round r+1 ends; the evaluation set is generated first on them
    (its chunks queued ahead of round r+1's: `chunks_sent`). Each chunk's KL goes to the learner as soon as the
    chunk is generated, so the learner computes it while the generators go on to round r+1's chunks. With a
    frozen copy of those weights on learner rank 0 (`frozen`, taken at round r's export) round r+1's steps never
    wait for it. Without one (ZeRO-3, whose ranks hold no full copy), round r+1's first training step waits until
    every chunk's KL is queued at the ranks (`kl_sent`), so they run on round r's weights. Scoring and judging go
    on beside the round. `result()` joins.
    """

    def __init__(self, round_index: int, prompts: list[Prompt], cfg: OdpoConfig, generators: ActorPool,
                 scorers: ActorPool, learners: LearnerGroup, initial: Initial, version: int, frozen: bool = False):
        self.round_index, self.cfg, self.scorers, self.initial, self.frozen = round_index, cfg, scorers, initial, frozen
        self.chunks_sent, self.kl_sent = threading.Event(), threading.Event()
        self.samples: Samples | None = None
        self.outcome: dict | BaseException | None = None
        self.start = time.perf_counter()
        self.thread = threading.Thread(target=self._run, args=(prompts, generators, learners, version), daemon=True,
                                       name=f"odpo-eval-round-{round_index}")
        self.thread.start()
        self.chunks_sent.wait()

    def _run(self, prompts: list[Prompt], generators: ActorPool, learners: LearnerGroup, version: int) -> None:
        try:
            # chunk by chunk as the chunks come: on rank 0's frozen copy, or on every rank's weights, which are
            # round r's until round r+1's first step, queued behind these (it waits for `kl_sent`)
            kl = KL(learners, frozen=self.frozen)
            chunks = generate(prompts, self.cfg, generators, version, sent=self.chunks_sent, on_chunk=kl.on_chunk)
            self.kl_sent.set()
            self.samples = score(chunks, self.cfg, self.scorers)
            self.outcome = metrics(self.samples, self.initial.result(), self.cfg, self.scorers, learners, kl)
        except BaseException as e:  # handed to the driver by result()
            self.outcome = e
        finally:
            self.chunks_sent.set()
            self.kl_sent.set()

    def redo_kl(self, learners: LearnerGroup) -> None:
        """The learner group died (and was rebuilt from round r's checkpoint) while this evaluation's KL was
        pending: compute it again on the new group (its policy: round r's weights), before the retried round
        trains."""
        self.thread.join()
        from orchestrator.pools import LearnerFailure

        if isinstance(self.outcome, LearnerFailure) and self.samples is not None:
            self.outcome = metrics(self.samples, self.initial.result(), self.cfg, self.scorers, learners)

    def result(self) -> dict:
        self.thread.join()
        if isinstance(self.outcome, UserFunctionError):  # the user's function: its own one line, not wrapped
            raise self.outcome
        if isinstance(self.outcome, BaseException):
            raise RuntimeError(f"the held-out evaluation of round {self.round_index} failed: {self.outcome}") from self.outcome
        return self.outcome | {"timing/eval": time.perf_counter() - self.start, "profile/eval_overlapped": 1}


def summary(m: dict) -> str:
    """The eval line: each figure with its 95% interval and its paired change from the initial policy."""
    def with_change(name: str, label: str) -> str:
        text = (f"{label} {stats.interval(m[f'eval/{name}_mean'], m.get(f'eval/{name}_ci95', math.nan))} "
                f"(initial {stats.interval(m[f'eval/{name}_initial'], m.get(f'eval/{name}_initial_ci95', math.nan))}")
        if f"eval/{name}_change" in m:
            text += f", change {stats.signed_interval(m[f'eval/{name}_change'], m[f'eval/{name}_change_ci95'])}"
        return text + ")"

    parts = []
    if "eval/gold_mean" in m:
        parts.append(with_change("gold", "gold"))
    if not math.isnan(m["eval/reward_mean"]):
        parts.append(with_change("reward", "proxy"))
    parts += [f"KL {stats.interval(m['eval/kl'], m.get('eval/kl_ci95', math.nan))}"]
    if "eval/nll" in m:
        parts.append(f"NLL/token {m['eval/nll']:.2f}" + (f" (initial {m['eval/nll_initial']:.2f})" if "eval/nll_initial" in m else ""))
    if "eval/rare_tokens" in m:
        parts.append(f"rare tokens {100 * m['eval/rare_tokens']:.1f}%"
                     + (f" (initial {100 * m['eval/rare_tokens_initial']:.1f}%)" if "eval/rare_tokens_initial" in m else ""))
    parts += [f"win rate vs initial {m['eval/win_rate']:.3f}", f"chars {m['eval/response_chars']:.1f}"]
    samples = f" ({m['eval/samples']} samples of {m['eval/prompts']} prompts)" if "eval/samples" in m else ""
    return f"eval{samples}: " + ", ".join(parts)


RARE_RATIO_BOUND = 2.0
"""The text counts as drifting when its rare-token share exceeds this multiple of the initial policy's own
(and 1% of tokens), or its NLL/token the initial's by NLL_MARGIN_BOUND nats (docs/results.md: what they caught)."""
NLL_MARGIN_BOUND = 1.0


def drift(m: dict) -> str | None:
    """Why the samples read unlike the initial policy's (made-up words, odd symbols, a collapsed format), or
    None while both fluency figures stay within their bounds."""
    if "eval/rare_tokens_initial" not in m:
        return None
    why = []
    if m["eval/rare_tokens"] > max(RARE_RATIO_BOUND * m["eval/rare_tokens_initial"], 0.01):
        why.append(f"{100 * m['eval/rare_tokens']:.1f}% of its tokens are ones the initial policy almost never writes "
                   f"(its own samples: {100 * m['eval/rare_tokens_initial']:.1f}%)")
    if m["eval/nll"] > m["eval/nll_initial"] + NLL_MARGIN_BOUND:
        why.append(f"NLL/token under the initial policy {m['eval/nll']:.2f} against {m['eval/nll_initial']:.2f} for its "
                   f"own samples")
    return "; ".join(why) or None


def report(m: dict, label: str) -> None:
    print(f"odpo: {label} {summary(m)}", file=sys.stderr)
    if (why := drift(m)) is not None:
        print(f"odpo: {label}: the text drifts from the initial policy's: {why} (a higher learner.beta or a "
              f"lower learner.lr keeps it closer; read a sample of pairs/round_*.jsonl)", file=sys.stderr)


def evaluate_checkpoint(checkpoint: str, cfg: OdpoConfig) -> dict:
    """`odpo eval CHECKPOINT CONFIG`: the held-out metrics of a saved policy against the config's initial
    policy (the reference), as the run reports them after the round that saved it. Also written to
    CHECKPOINT/eval.json."""
    quiet_libraries()
    bundle = read_checkpoint_weights(checkpoint, 1, syncs_adapters(cfg))  # what the config's generators load
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
        reference_nll(initial, learners)
        generators.weights_ref = ray.put(bundle)
        generators.get([a.load_weights.remote(generators.weights_ref) for a in generators.actors], "loading the checkpoint")
        result = metrics(sample(source.eval, cfg, generators, scorers, 1), initial, cfg, scorers, learners)
    result = {k: v for k, v in result.items() if k.startswith("eval/")}  # the figures; timings are a round's
    with open(os.path.join(checkpoint, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    report(result, checkpoint)
    return result
