"""The driver: `run(cfg)` is the algorithm, one round at a time, readable top to bottom.

    train the reward model first if the scorer asks for it (scorer.model_path=reward_training)
    sample the held-out eval prompts with the initial policy (eval.prompts)
    offline baseline (run.mode=offline): fix every round's pairs now (orchestrator/offline.py)
    for each round:
        apply a pending `odpo scale` request (rollout pools only; new actors load the current weights)
        stream prompts -> generators -> scorers -> pairs -> learner (first epoch; offline: the round's fixed pairs)
        replay the round's pairs for the remaining epochs
        export the policy once, load it into every generator (weight version + 1)
        evaluate on the held-out prompts
        write the checkpoint, the pairs and the metrics; redraw plots/rounds.png
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import ray

from actors.generator import generator_class, resolve_backend
from actors.learner import Learner
from actors.models import is_builtin, load_tokenizer, materialize_builtin, quiet_libraries
from actors.scorer import Scorer
from orchestrator import evaluation, offline
from orchestrator.config import TRAINED_REWARD_MODEL, OdpoConfig
from orchestrator.control import take_scale_request
from orchestrator.data import PromptSource
from orchestrator.outputs import RunDir
from orchestrator.plots import plot_rounds
from orchestrator.pools import ActorPool, LearnerFailure, LearnerGroup, Placement, PlacementError
from orchestrator.progress import RoundProgress
from orchestrator.streaming import RoundStream, replay_epochs, stream_round
from orchestrator.telemetry import Telemetry

# Passed to every worker so actors find the same caches and stay offline like the driver.
WORKER_ENV = ("TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE")


def run(cfg: OdpoConfig) -> str:
    """Run (or resume) every round of online iterative DPO; returns the run directory."""
    started = time.time()  # scale requests older than this were meant for an earlier driver
    quiet_libraries()
    source = PromptSource(cfg.data, cfg.run.seed, cfg.run.rounds, cfg.eval.prompts)  # bad data stops us here
    out = RunDir(cfg)  # a new run directory, or one to resume after its `out.completed` rounds
    policy_path, tokenizer_path, reward_path = resolve_models(cfg, out)
    tokenizer = load_tokenizer(tokenizer_path, cfg.policy.trust_remote_code)
    source.check_lengths(tokenizer, cfg.data)  # overlong prompts: truncate, skip or stop, before Ray starts
    out.save_policy_files(policy_path, tokenizer)
    # offline: saved rounds checked against the settings, a dataset's rows made into pairs (a bad one stops us here)
    fixed_set = offline.prepare(cfg, out, tokenizer) if cfg.run.mode == "offline" else None
    take_scale_request(out.path, written_after=started)  # one left by an earlier driver is dropped
    out.write_job_marker()
    started_ray = start_ray(cfg)
    pools: list[ActorPool] = []
    try:
        generators = build_generator_pool(cfg, policy_path, tokenizer_path, pools)
        if reward_path == out.sub("reward_model"):  # scorer.model_path=reward_training (may sample the policy)
            train_own_reward_model(cfg, out, reward_path, generators)
        scorers = build_scorer_pool(cfg, reward_path, pools)
        learners = build_learners(cfg, out, policy_path, tokenizer.pad_token_id, pools)
        version = out.completed  # weight version = rounds done
        # the initial policy's answers to the held-out prompts, before a resume loads later weights
        initial = evaluation.sample(source.eval, cfg, generators, scorers, 0) if source.eval else None
        fixed = offline.complete(fixed_set, cfg, source, generators, scorers) if fixed_set else None
        if version:
            print(f"odpo: resuming {out.path} after round {version - 1}", file=sys.stderr)
            generators.weights_ref = ray.put(out.read_checkpoint(version - 1, version))
            generators.get([a.load_weights.remote(generators.weights_ref) for a in generators.actors], "resuming")
        generators.wait_ready()  # round 0 starts with every engine built, so its timings are the round's own
        scorers.wait_ready()
        nccl = cfg.generator.weight_sync == "nccl"
        if nccl:  # GPUs: weights go learner rank 0 -> engines over NCCL; the object store carries only checkpoints
            learners.init_nccl_sync(generators.actors, cfg.generator.tensor_parallel_size)
        print(f"odpo: {len(generators)} {resolve_backend(cfg.generator.backend)} generator(s), {len(scorers)} "
              f"scorer(s), {cfg.learner.num_ranks} learner rank(s); weight sync: {cfg.generator.weight_sync}",
              file=sys.stderr)
        telemetry = Telemetry(cfg.run.name)
        history = out.history()
        for r in range(out.completed, cfg.run.rounds):
            apply_scale_request(out.path, generators, scorers, nccl)
            telemetry.start_round(r, version, {"generator": len(generators), "scorer": len(scorers),
                                               "learner": cfg.learner.num_ranks})
            for attempt in range(cfg.learner.max_round_retries + 1):
                try:
                    metrics, pairs, bundle_ref = run_round(r, version, cfg, source, generators, scorers, learners, nccl,
                                                           telemetry, initial, fixed[r] if fixed else None)
                    break
                except LearnerFailure as e:
                    if attempt == cfg.learner.max_round_retries or nccl:
                        raise RuntimeError(f"round {r}: {e}; learner.max_round_retries="
                                           f"{cfg.learner.max_round_retries} spent" + (
                                               " (retries need weight_sync=object_store)" if nccl else "")) from e
                    print(f"odpo: round {r}: {e}; retrying the round from the last checkpoint "
                          f"({attempt + 1}/{cfg.learner.max_round_retries})", file=sys.stderr)
                    pools.remove(learners.pool)
                    learners.pool.shutdown()
                    learners = build_learners(cfg, out, policy_path, tokenizer.pad_token_id, pools, attempt + 1)
            version += 1
            metrics["faults/learner_retries"] = attempt
            out.write_placement({p.name: p.nodes() for p in pools})
            commit_round(r, cfg, out, learners, ray.get(bundle_ref), pairs, metrics)
            history.append(metrics)
            telemetry.end_round(metrics)
            try:
                plot_rounds(history, out.path)
            except Exception as e:  # the round is committed; a plot is not worth stopping for
                print(f"odpo: could not draw {out.path}/plots/rounds.png: {e}", file=sys.stderr)
        print(format_table(history))
        if history and "eval/gold_mean" in history[-1]:
            print(evaluation.progress_line(history[0], history[-1]))
        print(f"odpo: run directory {out.path}")
        return out.path
    finally:  # pools first: nothing below may keep them alive (on SIGTERM, wandb's service is already gone)
        for pool in pools:
            try:
                pool.shutdown()
            except Exception as e:
                print(f"odpo: shutting down pool `{pool.name}`: {e}", file=sys.stderr)
        if started_ray:
            ray.shutdown()
        try:
            out.close()
        except Exception as e:
            print(f"odpo: closing wandb failed ({type(e).__name__}: {e}); metrics.jsonl holds every committed round",
                  file=sys.stderr)


def run_round(r: int, version: int, cfg: OdpoConfig, source: PromptSource, generators: ActorPool,
              scorers: ActorPool, learners: LearnerGroup, nccl: bool, telemetry: Telemetry | None = None,
              eval_initial: evaluation.Samples | None = None, fixed: RoundStream | None = None
              ) -> tuple[dict, list, ray.ObjectRef]:
    """One round: stream (offline: train the `fixed` pairs' first epoch), replay epochs, sync the new weights
    to the generators, evaluate. Returns the round's metrics, pairs and the new weights (a ref)."""
    round_start = time.perf_counter()
    prompts = source.round_prompts(r)
    progress = RoundProgress(r, cfg.run.rounds, len(prompts), cfg.metrics.progress_interval_s, telemetry=telemetry)
    from_data = fixed is not None and cfg.offline.dataset is not None  # data.path's prompts are not trained on
    learners.start_round(r, planned_steps(len(fixed.pairs) if from_data else len(prompts), cfg))

    if fixed is None:
        stream = stream_round(r, prompts, version, cfg, generators, scorers, learners, progress)
    else:
        stream = offline.train_round(r, fixed, cfg, learners, progress)
    progress.set_stage("epochs")
    replay_start = time.perf_counter()
    replay = replay_epochs(stream.pairs, cfg, r, learners, progress)
    replay_s = time.perf_counter() - replay_start

    progress.set_stage("sync")
    sync_start = time.perf_counter()
    export_refs = learners.async_export_refs(version + 1)
    learners.get(export_refs, "the weight export")
    sync_weights(generators, learners, export_refs, version + 1, nccl)
    sync_s = time.perf_counter() - sync_start
    progress.close()
    metrics = round_metrics(r, version + 1, stream, replay, replay_s, sync_s, time.perf_counter() - round_start,
                            {} if from_data else source.drops[r], 0 if from_data else source.truncated[r])
    if fixed is not None:  # offline: generation and scoring happened before training, not in this round
        metrics.update(dict.fromkeys(("gen/tokens_per_s", "score/tokens_per_s", "timing/generate", "timing/score",
                                      "timing/generate_span", "stream/first_scored_s", "stream/overlap",
                                      "gen/actors_used"), math.nan))
    metrics.update({"pool/generators": len(generators), "pool/scorers": len(scorers),
                    "pool/generators_dropped": generators.dropped, "pool/scorers_dropped": scorers.dropped})
    if eval_initial is not None:  # held-out prompts, with the weights just synced
        start = time.perf_counter()
        now = evaluation.sample(source.eval, cfg, generators, scorers, version + 1)
        metrics.update(evaluation.metrics(now, eval_initial, cfg, scorers, learners))
        metrics["timing/eval"] = time.perf_counter() - start
        evaluation.report(metrics, f"round {r + 1}/{cfg.run.rounds}")
    return metrics, stream.pairs, export_refs[0]


def apply_scale_request(run_dir: str, generators: ActorPool, scorers: ActorPool, nccl: bool) -> None:
    """Resize the rollout pools as `odpo scale` asked (between rounds; the learner is untouched)."""
    request = take_scale_request(run_dir)
    if not request:
        return
    if nccl and "generator" in request:
        print("odpo: ignoring a generator resize: weight_sync=nccl fixes the engines in one NCCL group at start; "
              "resize on resume instead", file=sys.stderr)
        request.pop("generator")
    for pool, size in ((generators, request.get("generator")), (scorers, request.get("scorer"))):
        if size is not None and size != len(pool):
            try:
                before, after = pool.resize(size)
            except (PlacementError, TimeoutError, ray.exceptions.RayError, ValueError) as e:
                # a request the cluster cannot meet does not end a long run; the pool keeps its size
                print(f"odpo: cannot resize the {pool.name} pool to {size}, going on with {len(pool)}: {e}",
                      file=sys.stderr)
                continue
            print(f"odpo: {pool.name} pool resized {before} -> {after}", file=sys.stderr)


def commit_round(r: int, cfg: OdpoConfig, out: RunDir, learners: LearnerGroup, bundle, pairs: list,
                 metrics: dict) -> None:
    """Checkpoint, pairs, metrics, then state.json: a round counts as done only once all are in place."""
    start = time.perf_counter()
    ckpt = out.write_checkpoint(r, bundle)
    if not cfg.learner.reset_optimizer_each_round:  # the next round continues AdamW's moments
        save_optimizer_states(ckpt, learners.optimizer_states())
    out.write_pairs(r, pairs)
    metrics["timing/checkpoint"] = time.perf_counter() - start
    out.log_metrics(metrics)
    out.commit(cfg, r + 1)


def resolve_models(cfg: OdpoConfig, out: RunDir) -> tuple[str, str, str | None]:
    """Builtin models are built once, here, into the run directory; everything loads from a path."""
    def built(location: str, name: str, seed: int) -> str:
        dest = out.sub("base_models", name)
        return dest if os.path.exists(os.path.join(dest, "config.json")) else materialize_builtin(location, dest, seed)

    policy = cfg.policy.path
    if is_builtin(policy):
        policy = built(policy, "policy", cfg.run.seed)
    reward = cfg.scorer.model_path if cfg.scorer.type in ("reward_model", "pairwise") else None
    if reward == TRAINED_REWARD_MODEL:  # trained by `run` once Ray is up, unless an earlier driver did
        reward = out.sub("reward_model")
    elif reward is not None and is_builtin(reward):
        reward = built(reward, "reward", cfg.run.seed + 1)
    return policy, cfg.policy.tokenizer or policy, reward


def train_own_reward_model(cfg: OdpoConfig, out: RunDir, path: str, generators: ActorPool | None = None) -> None:
    """scorer.model_path=reward_training: train the reward model once per run directory. One trained with
    other reward_training settings is trained again while no round has used it; after that, a resume with
    other settings is refused."""
    from orchestrator.reward_training import RECORD_FILE, fit_reward_model, training_record

    if out.made_with(path, RECORD_FILE, training_record(cfg), "reward model"):
        print(f"odpo: using the reward model this run trained, {path}", file=sys.stderr)
    else:
        fit_reward_model(cfg, path, out.sub("reward_model_metrics.jsonl"), out.sub("base_models", "reward"),
                         generators=generators)


def start_ray(cfg: OdpoConfig) -> bool:
    """Join or start a cluster; False when Ray was already initialised by the caller.

    As a Ray job (`odpo submit`, `ray job submit`), the driver joins the job's cluster and its runtime_env
    (working_dir, env_vars) is inherited by every actor. A local cluster keeps Ray's token authentication on and binds its dashboard to ray.dashboard_host."""
    if ray.is_initialized():
        return False
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # submitted as a Ray job: join the job's cluster
    address = cfg.ray.address or ("auto" if in_job else None)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(os.path.join(".cache", "torch_extensions")))
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"
    if in_job:  # the job's runtime_env reaches every actor; add only what it leaves unset (Ray refuses overlaps)
        job_env = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("runtime_env", {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in job_env}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=True)
    else:
        needed = math.ceil(cfg.generator.num_actors * cfg.generator.cpus_per_actor
                           + cfg.scorer.num_actors * cfg.scorer.cpus_per_actor
                           + cfg.learner.num_ranks * cfg.learner.cpus_per_rank)
        ray.init(address="local",  # a new cluster even if RAY_ADDRESS or a running one is around
                 num_cpus=cfg.ray.num_cpus or max(needed, os.cpu_count() or 1),
                 include_dashboard=cfg.ray.include_dashboard, dashboard_host=cfg.ray.dashboard_host,
                 runtime_env={"env_vars": env})
    return True


def build_rollout_pools(cfg: OdpoConfig, policy_path: str, tokenizer_path: str, reward_path: str | None,
                        pools: list[ActorPool]) -> tuple[ActorPool, ActorPool]:
    """Generator and scorer pools, each in its own placement group; each actor gets only its own section."""
    return build_generator_pool(cfg, policy_path, tokenizer_path, pools), build_scorer_pool(cfg, reward_path, pools)


def build_generator_pool(cfg: OdpoConfig, policy_path: str, tokenizer_path: str, pools: list[ActorPool]) -> ActorPool:
    g, p = cfg.generator, cfg.policy
    pools.append(ActorPool("generator", generator_class(g.backend), g.num_actors,
                           placement(cfg, g.cpus_per_actor, g.gpus_per_actor, g.resources, g.node_labels),
                           lambda r: (g, policy_path, tokenizer_path, p.dtype, cfg.data.max_prompt_length,
                                      p.trust_remote_code, f"generator-{r}"), g.max_restarts,
                           call_timeout_s=g.call_timeout_s, start_timeout_s=cfg.ray.actor_start_timeout_s))
    return pools[-1]


def build_scorer_pool(cfg: OdpoConfig, reward_path: str | None, pools: list[ActorPool]) -> ActorPool:
    s = cfg.scorer
    pools.append(ActorPool("scorer", Scorer, s.num_actors,
                           placement(cfg, s.cpus_per_actor, s.gpus_per_actor, s.resources, s.node_labels),
                           lambda r: (s, reward_path, f"scorer-{r}"), s.max_restarts,
                           call_timeout_s=s.call_timeout_s, start_timeout_s=cfg.ray.actor_start_timeout_s))
    return pools[-1]


def placement(cfg: OdpoConfig, cpus: float, gpus: float, resources: dict, labels: dict) -> Placement:
    return Placement(cpus, gpus, dict(resources), dict(labels), cfg.ray.placement_timeout_s,
                     cfg.ray.replace_placement_timeout_s)


def build_learners(cfg: OdpoConfig, out: RunDir, initial_policy: str, pad_id: int, pools: list[ActorPool],
                   incarnation: int = 0) -> LearnerGroup:
    """The learner group, starting from the last committed round's checkpoint (or the initial policy)."""
    lc, p = cfg.learner, cfg.policy
    policy = out.checkpoint_dir(out.completed - 1) if out.completed else initial_policy
    reference = policy if lc.reference == "previous" else initial_policy
    pool = ActorPool("learner", Learner, lc.num_ranks,
                     placement(cfg, lc.cpus_per_rank, lc.gpus_per_rank, lc.resources, lc.node_labels),
                     lambda r: (lc, policy, p.dtype, r, lc.num_ranks, pad_id, p.trust_remote_code, reference),
                     incarnation=incarnation, gang=True)
    pools.append(pool)
    learners = LearnerGroup(pool, lc.step_timeout_s)
    learners.setup()
    if out.completed and not lc.reset_optimizer_each_round:
        learners.load_optimizer_states(load_optimizer_states(policy, lc.num_ranks))
    return learners


def save_optimizer_states(checkpoint: str, payloads: list[bytes]) -> None:
    os.makedirs(os.path.join(checkpoint, "optimizer"), exist_ok=True)
    for rank, payload in enumerate(payloads):
        with open(os.path.join(checkpoint, "optimizer", f"rank_{rank}.safetensors"), "wb") as f:
            f.write(payload)


def load_optimizer_states(checkpoint: str, ranks: int) -> list[bytes]:
    paths = [os.path.join(checkpoint, "optimizer", f"rank_{r}.safetensors") for r in range(ranks)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"cannot restore AdamW state: {missing[0]} is missing (saved only with "
                                "learner.reset_optimizer_each_round=false and the same learner.num_ranks)")
    return [open(p, "rb").read() for p in paths]


def planned_steps(num_prompts: int, cfg: OdpoConfig) -> int:
    """Optimizer steps the round's schedule spans: every prompt a pair (drops make the round shorter)."""
    return math.ceil(num_prompts / cfg.learner.global_batch_size) * cfg.learner.epochs


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


def round_metrics(r: int, version: int, stream: RoundStream, replay: list, replay_s: float, sync_s: float,
                  round_s: float, skipped: dict[str, int], truncated: int) -> dict:
    """`skipped`: the round's prompts dropped before Ray started (they count as drops too)."""
    steps = stream.steps + replay
    trained = sum(s.pairs for s in steps)

    def pair_mean(attr: str) -> float:
        return sum(getattr(s, attr) * s.pairs for s in steps) / trained if trained else float("nan")

    rewards = np.asarray(stream.rewards or [math.nan], dtype=np.float64)  # offline.dataset pairs have none
    return {
        "round": r, "weight_version": version,
        "prompts/count": len(stream.pairs) + sum(stream.drops.values()) + sum(skipped.values()),
        "prompts/truncated": truncated, "pairs/count": len(stream.pairs),
        **{f"drop/{k}": v for k, v in (stream.drops | skipped).items()},
        "reward/mean": float(rewards.mean()), "reward/max": float(rewards.max()),
        "reward/min": float(rewards.min()), "reward/std": float(rewards.std()),
        "gen/tokens": stream.new_tokens,
        "gen/tokens_per_s": stream.new_tokens / stream.generate_span_s if stream.generate_span_s else float("nan"),
        "score/tokens_per_s": stream.new_tokens / stream.wall_s if stream.wall_s else float("nan"),
        "train/tokens": sum(s.tokens for s in steps),
        "train/tokens_per_s": sum(s.tokens for s in steps) / (stream.wall_s + replay_s) if stream.wall_s else float("nan"),
        "gen/response_chars_mean": float(np.mean(stream.response_chars)) if stream.response_chars else math.nan,
        "train/loss": pair_mean("loss"), "train/accuracy": pair_mean("accuracy"),
        "train/chosen_reward": pair_mean("chosen_reward"), "train/rejected_reward": pair_mean("rejected_reward"),
        "train/margin": pair_mean("chosen_reward") - pair_mean("rejected_reward"),
        "train/steps": len(steps), "train/pairs_seen": trained,
        "train/lr_last": steps[-1].lr if steps else float("nan"),
        "train/grad_norm_last": steps[-1].grad_norm if steps else float("nan"),
        "timing/round": round_s, "timing/stream": stream.wall_s,
        "timing/generate": stream.busy["generate"], "timing/score": stream.busy["score"],
        "timing/train": stream.busy["train"] + sum(s.seconds for s in replay), "timing/replay": replay_s,
        "timing/train_streamed": stream.busy["train"],
        "timing/sync": sync_s, "sync/seconds": sync_s,
        **{f"faults/{k}": v for k, v in stream.faults.items()},
        "timing/generate_span": stream.generate_span_s,
        "stream/first_scored_s": stream.first_scored_s, "stream/first_train_s": stream.first_train_s,
        "stream/overlap": (sum(stream.busy.values()) / stream.wall_s) if stream.wall_s else float("nan"),
        "gen/actors_used": len(stream.chunks_by_actor), "stream/chunks": stream.chunks,
        "score/comparisons": stream.comparisons,
        "stream/dispatched_at_first_score": stream.dispatched_at_first_score,
        "stream/released_at_first_train": stream.released_at_first_train,
    }


TABLE_COLUMNS = (("round", "round", "{:d}"), ("reward/mean", "reward mean", "{:.4f}"),
                 ("reward/max", "reward max", "{:.4f}"), ("pairs/count", "pairs", "{:d}"), ("drop/tie", "ties", "{:d}"),
                 ("train/loss", "loss", "{:.4f}"), ("train/accuracy", "accuracy", "{:.3f}"),
                 ("gen/tokens_per_s", "gen tok/s", "{:.0f}"), ("eval/reward_mean", "eval proxy", "{:.4f}"),
                 ("eval/gold_mean", "eval gold", "{:.4f}"),
                 ("eval/win_rate", "eval win", "{:.3f}"), ("eval/kl", "eval KL", "{:.3f}"),
                 ("timing/round", "seconds", "{:.1f}"))


def format_table(history: list[dict]) -> str:
    columns = [c for c in TABLE_COLUMNS if any(c[0] in m for m in history)]  # eval columns when evaluated
    header = [title for _, title, _ in columns]
    rows = [[fmt.format(m[key]) if m.get(key) is not None and not (isinstance(m[key], float) and math.isnan(m[key]))
             else "-" for key, _, fmt in columns] for m in history]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
