"""The driver: `run(cfg)` is online iterative DPO, one round at a time, readable top to bottom.

Set-up, tear-down and the learner's retries are the session's (orchestrator/session.py); a round's data
flow is orchestrator/streaming.py; the offline baseline's pairs are orchestrator/offline.py's; what a round
reports is orchestrator/report.py's. The steps of a round are the functions below, in the order they run.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import ray

from actors.types import TrainStepStats, WeightBundle
from orchestrator import ahead, chaos, evaluation, offline
from orchestrator.config import OdpoConfig, syncs_adapters
from orchestrator.control import apply_scale_request
from orchestrator.plots import plot_rounds
from orchestrator.pools import ActorPool, LearnerGroup
from orchestrator.progress import RoundProgress
from orchestrator.report import pairs_line, print_summary, profile, round_metrics
from orchestrator.session import Session, open_session
from orchestrator.streaming import RoundStream, replay_epochs, stream_round


def run(cfg: OdpoConfig) -> str:
    """Run (or resume) every round of online iterative DPO; returns the run directory."""
    with open_session(cfg) as s:  # prompts, run dir, models, Ray, pools, own reward model, initial answers, resume
        for r in range(s.out.completed, cfg.run.rounds):
            apply_scale_request(s.out.path, s.generators, s.scorers, s.nccl)  # `odpo scale`: rollout pools only
            s.telemetry.start_round(r, s.version, s.pool_sizes())
            start_deferred_evaluation(s)  # the last round's, on the weights the generators still hold
            s.draw = ahead.start(s, r)  # run.staleness=1: round r+1's pairs, drawn meanwhile from these weights
            # generate -> score -> pair -> train epoch 1, streamed (or the pairs drawn ahead); epochs 2..E;
            # export (a dead learner: again)
            trained, retries = s.retrying_learner(train, r)
            finish_deferred_evaluation(s)  # into the last round's metrics line, before the weights move on
            lag = ahead.finish(s, s.draw, trained.stream)  # round r+1's pairs in hand before the weights move on
            sync_s = sync(s, trained)  # every generator loads version + 1
            metrics = round_metrics(r, s.version, trained.stream, trained.replay, trained.replay_s, sync_s,
                                    time.perf_counter() - trained.start, trained.skipped, trained.truncated) | lag
            if s.initial is not None and not defers_evaluation(s.cfg, r):
                metrics |= evaluate(s, r)  # the held-out prompts, answered with the new weights
            commit(s, r, trained, metrics | {"faults/learner_retries": retries})
            s.evaluation_due = s.initial is not None and defers_evaluation(s.cfg, r)
        print_summary(s.history, s.out.path)
        return s.out.path


PLOT_EVERY_S = 30.0
"""plots/rounds.png is redrawn after a round once this long has passed since the last drawing, and after the
last round: drawing costs about a second of the driver's CPU, which rounds of a few seconds should not pay."""


@dataclass
class Trained:
    start: float
    stream: RoundStream
    replay: list[TrainStepStats]
    replay_s: float
    export_refs: list[ray.ObjectRef]
    export_s: float
    progress: RoundProgress
    skipped: dict[str, int]
    """The round's prompts dropped before Ray started (bad or overlong rows)."""
    truncated: int


def train(s: Session, r: int) -> Trained:
    """Round r's pairs and its optimizer steps: epoch 1 streamed as pairs form (offline: over the round's
    fixed pairs), epochs 2..E replayed, then the new weights exported once (a ref, in the object store)."""
    start, cfg = time.perf_counter(), s.cfg
    prompts = s.source.round_prompts(r)
    progress = RoundProgress(r, cfg.run.rounds, len(prompts), cfg.metrics.progress_interval_s, telemetry=s.telemetry)
    from_data = s.fixed is not None and cfg.offline.dataset is not None  # offline.dataset: data.path is not trained on
    s.learners.start_round(r, planned_steps(len(s.fixed[r].pairs) if from_data else len(prompts), cfg))
    # the last round's evaluation without a frozen copy: its KL runs on the weights before this round's steps
    gate = s.deferred.kl_sent if s.deferred is not None and not s.deferred.frozen else None
    fixed = s.fixed[r] if s.fixed is not None else s.pending.get(r)  # offline, or drawn by the round before
    if fixed is None:
        generated = s.draw.generated if s.draw is not None else None  # the draw ahead starts once it is set
        stream = stream_round(r, prompts, s.version, cfg, s.generators, s.scorers, s.learners, progress, gate,
                              generated)
    else:
        if from_data:  # the dataset's rows in file order, in chunks as streaming would cut them
            chunks = [i // cfg.generator.chunk_size for i in range(len(s.fixed[r].pairs))]
        else:  # drawn from the round's prompts: each pair's chunk is its prompt's
            position = {p.uid: i for i, p in enumerate(prompts)}
            chunks = [position[p.uid] // cfg.generator.chunk_size for p in fixed.pairs]
        stream = offline.train_round(r, fixed, cfg, s.learners, progress, chunks, gate)
    progress.set_stage("epochs")
    replay_start = time.perf_counter()
    replay = replay_epochs(stream.pairs, cfg, r, s.learners, progress)
    replay_s = time.perf_counter() - replay_start
    progress.set_stage("sync")
    export_start = time.perf_counter()
    if s.deferred is not None and s.deferred.frozen:  # its KL, on the frozen copy, goes before this export replaces it
        s.deferred.kl_sent.wait()
    freeze = freezes_for_evaluation(cfg, r)
    export_refs = s.learners.async_export_refs(s.version + 1, freeze, syncs_adapters(cfg))
    s.learners.get(export_refs, "the weight export")
    s.froze_round = r if freeze else None
    return Trained(start, stream, replay, replay_s, export_refs, time.perf_counter() - export_start, progress,
                   {} if from_data else s.source.drops[r], 0 if from_data else s.source.truncated[r])


def planned_steps(num_prompts: int, cfg: OdpoConfig) -> int:
    """Optimizer steps the round's schedule spans: every prompt a pair (drops make the round shorter)."""
    return math.ceil(num_prompts / cfg.learner.global_batch_size) * cfg.learner.epochs


def sync(s: Session, trained: Trained) -> float:
    """The exported weights into every generator (version + 1); seconds, the export included."""
    start = time.perf_counter()
    sync_weights(s.generators, s.learners, trained.export_refs, s.version + 1, s.nccl)
    s.version += 1
    trained.progress.close()
    return trained.export_s + time.perf_counter() - start


def sync_weights(generators: ActorPool, learners: LearnerGroup, export_refs: list[ray.ObjectRef], version: int,
                 nccl: bool) -> None:
    """Every generator loads the one exported bundle (passed by reference), or receives the NCCL broadcast,
    and reports its version. A generator that dies meanwhile is replaced and loads the bundle as it starts."""
    generators.weights_ref = export_refs[0]
    if nccl:
        learners.get(learners.async_send_nccl_refs(), "the NCCL weight broadcast")
        reported = generators.get([a.set_weight_version.remote(version) for a in generators.actors], "the sync")
    else:
        slots = list(generators.slots)
        refs = [slot.actor.load_weights.remote(export_refs[0]) for slot in slots]
        chaos.point("sync", version - 1)
        reported = []
        for slot, ref in zip(slots, refs):
            try:
                reported.append(ray.get(ref, timeout=generators.call_timeout_s))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                # a replacement loads the bundle as it starts; with no room for one the pool goes on without it
                if generators.replace(slot, f"failed during the weight sync ({type(e).__name__})"):
                    reported.append(generators.get([slot.actor.weight_version.remote()], "the sync")[0])
    if any(v != version for v in reported):
        raise RuntimeError(f"weight sync to version {version} failed: generators report {reported}")


def defers_evaluation(cfg: OdpoConfig, r: int) -> bool:
    """Round r's evaluation runs during round r + 1 (eval.overlap), except after the last round and with a
    `previous` reference, which the next round replaces before its KL could run."""
    return cfg.eval.overlap and r + 1 < cfg.run.rounds and cfg.learner.reference == "fixed"


def freezes_for_evaluation(cfg: OdpoConfig, r: int) -> bool:
    """Round r's export leaves a frozen copy of its weights on learner rank 0 for its deferred evaluation's KL, so
    that the next round need not wait for it: with every ZeRO stage but 3, whose ranks hold no full copy."""
    return defers_evaluation(cfg, r) and cfg.learner.zero_stage < 3


def start_deferred_evaluation(s: Session) -> None:
    if s.evaluation_due:
        r = s.out.completed - 1
        # a driver that resumed has no frozen copy: the learner's own weights are round r's until it steps
        frozen = freezes_for_evaluation(s.cfg, r) and s.froze_round == r
        s.deferred = evaluation.Deferred(r, s.source.eval, s.cfg, s.generators, s.scorers, s.learners, s.initial,
                                         s.version, frozen)
        s.evaluation_due = False


def finish_deferred_evaluation(s: Session) -> None:
    """The deferred evaluation's figures go into its round's metrics line (the last one committed); the initial
    policy's samples, taken during this round (round 0 of a fresh run), count in its profile."""
    if s.initial is not None and not s.initial.accounted:
        busy = s.initial.result().busy
        s.initial.accounted = True
        s.overlapped_busy = {"generator": busy["generate"], "scorer": busy["score"], "learner": busy["nll"]}
    if s.deferred is None:
        return
    deferred, s.deferred = s.deferred, None
    metrics = deferred.result()
    evaluation.report(metrics, f"round {deferred.round_index + 1}/{s.cfg.run.rounds}")
    with s.out.writing(f"round {deferred.round_index}'s evaluation into metrics.jsonl"):
        s.out.amend_last_metrics(metrics)
    s.history[-1] |= metrics
    s.overlapped_busy = {"generator": metrics["timing/eval_generate"], "learner": metrics["timing/eval_kl"],
                         "scorer": metrics["timing/eval_score"] + metrics["timing/eval_judge"]}


def evaluate(s: Session, r: int) -> dict:
    """The held-out metrics of the weights just synced, against the initial policy's answers."""
    start = time.perf_counter()
    kl = evaluation.KL(s.learners)  # each chunk's KL computed while the generators go on to the next
    now = evaluation.sample(s.source.eval, s.cfg, s.generators, s.scorers, s.version, kl)
    metrics = evaluation.metrics(now, s.initial.result(), s.cfg, s.scorers, s.learners, kl)
    metrics["timing/eval"] = time.perf_counter() - start
    evaluation.report(metrics, f"round {r + 1}/{s.cfg.run.rounds}")
    return metrics


def checkpoint_weights(s: Session, synced: WeightBundle) -> tuple[WeightBundle | None, dict[str, bytes] | None]:
    """The round's whole policy (None when only adapters were synced and learner.lora.save_merged is off) and a
    LoRA run's adapters in PEFT's files (None without)."""
    if synced.holds_adapter:
        merged = None
        if s.cfg.learner.lora.save_merged:  # the whole policy, merged, for the checkpoint alone
            merged = s.learners.get(s.learners.async_export_refs(synced.version), "the merged export")[0]
        return merged, synced.adapter_files()
    return synced, s.learners.adapter_files() if s.cfg.learner.lora.rank > 0 else None


def commit(s: Session, r: int, trained: Trained, metrics: dict) -> None:
    """Checkpoint, pairs, metrics (and the next round's pairs when this round drew them), then state.json:
    a round counts as done only once all are in place."""
    metrics |= {"pool/generators": len(s.generators), "pool/scorers": len(s.scorers),
                "pool/generators_dropped": s.generators.dropped, "pool/scorers_dropped": s.scorers.dropped}
    metrics |= s.startup  # this driver's start-up, in the first round line it commits
    s.startup = {}
    with s.out.writing(f"round {r}'s files"):  # a full disk stops the run here, round r - 1 intact
        s.out.write_placement(s.cluster.nodes())
        start = time.perf_counter()
        optimizer = [] if s.cfg.learner.reset_optimizer_each_round else s.learners.optimizer_states()
        synced = ray.get(trained.export_refs[0])
        metrics["sync/bytes"] = synced.num_bytes()  # the whole policy, or a LoRA run's adapters alone
        weights, adapter = checkpoint_weights(s, synced)
        s.out.write_checkpoint(r, weights, optimizer, adapter)  # AdamW's moments for the next round
        chaos.point("checkpoint", r)
        s.out.write_pairs(r, trained.stream.pairs)
        if r + 1 in s.pending:  # drawn during this round (run.staleness=1)
            ahead.save(s.out, r + 1, s.pending[r + 1])
        metrics["timing/checkpoint"] = time.perf_counter() - start
        metrics |= profile(metrics, trained.export_s, s.pool_sizes(), time.perf_counter() - trained.start,
                           s.overlapped_busy, s.peak_flops, s.cfg.ray.colocate)
        metrics |= s.telemetry.driver_usage()  # the driver's own CPU and memory, round by round
        s.out.log_metrics(metrics)
        chaos.point("commit", r)
        s.out.commit(s.cfg, r + 1)
    s.overlapped_busy = {}
    s.pending.pop(r, None)
    ahead.forget(s.out, r)
    s.history.append(metrics)
    print(pairs_line(metrics, s.cfg.run.rounds), file=sys.stderr)
    s.telemetry.end_round(metrics)
    if r + 1 == s.cfg.run.rounds or time.monotonic() - s.plotted_at >= PLOT_EVERY_S:
        s.plotted_at = time.monotonic()
        try:
            plot_rounds(s.history, s.out.path)
        except Exception as e:  # the round is committed; a plot is not worth stopping for
            print(f"odpo: could not draw {s.out.path}/plots/rounds.png: {e}", file=sys.stderr)

