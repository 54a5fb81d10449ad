"""A run's set-up and tear-down, so that `driver.run` holds only the rounds.

`open_session(cfg)` prepares, in order:
    the prompts, checked before Ray starts (a bad row stops the run here)
    the run directory, new or resumed after its `completed` rounds
    while Ray starts: the models (builtins built once into the run directory, everything else loaded from a
    path), the prompts' lengths checked with the tokenizer, and the offline baseline's pair set
    (run.mode=offline), checked against the settings it was made with
    the generator pool
    the run's own reward model (scorer.model_path=reward_training), trained once, sampling the generator pool
    the scorer pool and the learner group (from the last checkpoint, with its optimizer state), then wandb's run
    the initial policy's answers to the held-out prompts, and the offline rounds still to be drawn
    on resume, the last checkpoint's weights in every generator; NCCL between learner and engines on GPUs
and on exit shuts the pools and Ray down, then closes wandb. It also retries a round whose learner group died.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray

from actors.models import load_tokenizer
from actors.worker import quiet_libraries
from orchestrator import ahead, evaluation, offline
from orchestrator.cluster import Cluster, in_ray_job, resolve_backend
from orchestrator.config import OdpoConfig, syncs_adapters
from orchestrator.control import take_scale_request
from orchestrator.data import PromptSource
from orchestrator.outputs import RunDir, resolve_models
from orchestrator.pools import ActorPool, LearnerFailure, LearnerGroup
from orchestrator.reward_training import train_own_reward_model
from orchestrator.streaming import RoundStream
from orchestrator.telemetry import Telemetry

T = TypeVar("T")


@dataclass
class Session:
    cfg: OdpoConfig
    out: RunDir
    source: PromptSource
    cluster: Cluster
    policy_path: str
    pad_id: int
    generators: ActorPool
    scorers: ActorPool
    learners: LearnerGroup
    version: int
    """The weights the generators hold: rounds done."""
    nccl: bool
    telemetry: Telemetry
    history: list[dict]
    initial: evaluation.Initial | None
    """The initial policy's answers to the held-out prompts (None without eval.prompts)."""
    fixed: list[RoundStream] | None
    """The offline baseline's pairs, round by round (None online)."""
    plotted_at: float = float("-inf")
    """time.monotonic() of the last drawing of plots/rounds.png (see driver.PLOT_EVERY_S)."""
    startup: dict[str, float] = field(default_factory=dict)
    """This driver's start-up, broken down (`startup/*`); it goes into the first round line it commits."""
    evaluation_due: bool = False
    """The last committed round's evaluation is still to run, during the next round (eval.overlap)."""
    deferred: evaluation.Deferred | None = None
    """That evaluation, running."""
    peak_flops: float = float("nan")
    """A learner rank's matmul FLOP/s, measured once at start-up with every pool idle (profile/learner_vs_peak)."""
    froze_round: int | None = None
    """The round whose export left a frozen copy of its weights on learner rank 0 (for its deferred evaluation)."""
    overlapped_busy: dict[str, float] = field(default_factory=dict)
    """Pool seconds a deferred evaluation or a draw ahead spent during the round now running (its profile
    counts them)."""
    pending: dict[int, RoundStream] = field(default_factory=dict)
    """run.staleness=1: the pairs drawn ahead for the next round (orchestrator/ahead.py)."""
    draw: ahead.Draw | None = None
    """The draw running during this round."""

    def pool_sizes(self) -> dict[str, int]:
        return {"generator": len(self.generators), "scorer": len(self.scorers), "learner": self.cfg.learner.num_ranks}

    def retrying_learner(self, step: Callable[[Session, int], T], r: int) -> tuple[T, int]:
        """`step(self, r)`, run again on a new learner group (from the last checkpoint) while the group dies or
        hangs, up to learner.max_round_retries times; returns its result and the retries it took."""
        retries = self.cfg.learner.max_round_retries
        for attempt in range(retries + 1):
            try:
                return step(self, r), attempt
            except LearnerFailure as e:
                if attempt == retries or self.nccl:
                    raise RuntimeError(f"round {r}: {e}; learner.max_round_retries={retries} spent"
                                       + (" (retries need weight_sync=object_store)" if self.nccl else "")) from e
                print(f"odpo: round {r}: {e}; retrying the round from the last checkpoint ({attempt + 1}/{retries})",
                      file=sys.stderr)
                self.cluster.remove(self.learners.pool)
                self.learners = build_learners(self.cfg, self.cluster, self.out, self.policy_path, self.pad_id,
                                               attempt + 1)
                if self.deferred is not None:  # the last round's KL, if the dead group never answered it
                    self.deferred.redo_kl(self.learners)
                if self.initial is not None:  # the initial samples' NLL likewise (round 0)
                    self.initial.redo_nll(self.learners)
        raise AssertionError("unreachable")


@contextmanager
def open_session(cfg: OdpoConfig) -> Iterator[Session]:
    started = time.time()  # scale requests older than this were meant for an earlier driver
    clock = StartupClock()
    quiet_libraries()
    source = PromptSource(cfg.data, cfg.run.seed, cfg.run.rounds, cfg.eval.prompts)  # bad data stops us here
    out = RunDir(cfg)
    preparing = None
    try:
        take_scale_request(out.path, written_after=started)  # one left by an earlier driver is dropped
        with out.writing("job.json"):
            out.write_job_marker()
        clock.lap("before_ray")  # prompts read and checked, the run directory
        # Ray's start keeps about one of 2 cores busy for 4-5 s: the models are prepared beside it. Not in a
        # Ray job: its driver runs in the job's copy of its working_dir, which Ray removes as the driver joins
        # (seen with Ray 2.60.0: os.getcwd() fails from then on), and transformers reads the current directory
        # as it is imported
        preparing = InBackground(prepare_models, cfg, source, out, now=in_ray_job())
        with Cluster(cfg) as cluster:
            clock.lap("ray")
            policy_path, tokenizer_path, reward_path, tokenizer, fixed_set = preparing.result()  # errors stop us here
            clock.lap("models")  # what the models took beyond Ray's start
            generators = cluster.generators(policy_path, tokenizer_path)
            if reward_path == out.sub("reward_model"):  # scorer.model_path=reward_training (may sample the policy)
                with out.writing("the run's reward model (reward_model/)"):
                    train_own_reward_model(cfg, out, reward_path, generators, cluster)
            clock.lap("reward_model")  # with the generator pool's build when it samples the policy
            scorers = cluster.scorers(reward_path)
            learners = build_learners(cfg, cluster, out, policy_path, tokenizer.pad_token_id)
            clock.lap("learners")  # placed, built and joined (DeepSpeed's set-up), while the other pools build
            out.start_wandb(cfg)  # here, not before Ray: while the generators still build
            clock.lap("wandb")
            # the initial policy's answers to the held-out prompts: a resumed run's now, before it loads later weights
            initial = None
            if source.eval and out.completed:
                initial = evaluation.Initial(source.eval, cfg, generators, scorers, learners, background=False)
            clock.lap("initial_eval")
            fixed = offline.complete(fixed_set, cfg, source, generators, scorers) if fixed_set else None
            if out.completed:
                print(f"odpo: resuming {out.path} after round {out.completed - 1}", file=sys.stderr)
                generators.weights_ref = ray.put(out.read_checkpoint(out.completed - 1, out.completed,
                                                                     syncs_adapters(cfg)))
                generators.get([a.load_weights.remote(generators.weights_ref) for a in generators.actors], "resuming")
            generators.wait_ready()  # round 0 starts with every engine built, so its timings are the round's own
            scorers.wait_ready()
            peak_flops = learners.matmul_flops()  # while every pool is idle: profile/learner_vs_peak's measure
            if source.eval and not out.completed:  # a fresh run's: during round 0, queued ahead of its chunks
                initial = evaluation.Initial(source.eval, cfg, generators, scorers, learners, background=True)
            clock.lap("rest")
            nccl = cfg.generator.weight_sync == "nccl"
            if nccl:  # GPUs: weights go learner rank 0 -> engines over NCCL; the object store carries only checkpoints
                learners.init_nccl_sync(generators.actors, cfg.generator.tensor_parallel_size)
            together = f"; {'+'.join(cfg.ray.colocate)} colocated, taking turns" if cfg.ray.colocate else ""
            print(f"odpo: {len(generators)} {resolve_backend(cfg.generator.backend)} generator(s), {len(scorers)} "
                  f"scorer(s), {cfg.learner.num_ranks} learner rank(s); weight sync: {cfg.generator.weight_sync}"
                  f"{together}", file=sys.stderr)
            startup = clock.summary(generators=generators.build_seconds(), scorers=scorers.build_seconds())
            print("odpo: start-up " + ", ".join(f"{k.removeprefix('startup/')} {v:.1f}s" for k, v in startup.items()),
                  file=sys.stderr)
            session = Session(cfg, out, source, cluster, policy_path, tokenizer.pad_token_id, generators, scorers,
                              learners, out.completed, nccl, Telemetry(cfg.run.name), out.history(), initial, fixed,
                              startup=startup, pending=ahead.load(out, out.completed) if cfg.run.staleness else {},
                              peak_flops=peak_flops)
            # the last committed round's deferred evaluation, lost with the driver that was running it, runs now
            session.evaluation_due = bool(initial is not None and session.history
                                          and "eval/win_rate" not in session.history[-1])
            try:
                yield session
            finally:  # a draw ahead still running when the run stops must not outlive its pools
                if session.draw is not None:
                    session.draw.cancel()
    except Exception as e:
        if preparing is not None:  # Ray failed to start: the models' thread may still write into the run directory
            preparing.join()
            if preparing.error is not None and preparing.error is not e:
                print(f"odpo: preparing the models failed too: {type(preparing.error).__name__}: {preparing.error}",
                      file=sys.stderr)
        raise
    finally:  # after the pools: nothing may keep them alive (on SIGTERM, wandb's service is already gone)
        try:
            out.close()
        except Exception as e:
            print(f"odpo: closing wandb failed ({type(e).__name__}: {e}); metrics.jsonl holds every committed round",
                  file=sys.stderr)


class InBackground:
    """`fn(*args)` in a daemon thread: a Ctrl-C or SIGTERM to the driver is not held up by it. `result()` waits
    for it and returns its value or raises its error. With `now`, `fn` runs here instead (its error raised here)."""

    def __init__(self, fn: Callable[..., T], *args: Any, now: bool = False):
        self.value: Any = fn(*args) if now else None
        self.error: BaseException | None = None
        self.thread = None if now else threading.Thread(target=self._run, args=(fn, args), name="odpo-models",
                                                         daemon=True)
        if self.thread is not None:
            self.thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self.value = fn(*args)
        except BaseException as e:
            self.error = e

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def result(self) -> Any:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def prepare_models(cfg: OdpoConfig, source: PromptSource, out: RunDir) -> tuple[str, str, str | None, Any, Any]:
    """The policy's, tokenizer's and reward model's paths (a builtin converted once), the tokenizer, the prompts'
    lengths checked with it (overlong ones truncated, skipped or refused), the policy's files in base/, and the
    offline baseline's pair set (its saved rounds checked against the settings, a dataset's rows made into pairs).
    Runs while Ray starts; a bad prompt or model stops the run before any pool is built."""
    policy_path, tokenizer_path, reward_path = resolve_models(cfg, out.path)
    tokenizer = load_tokenizer(tokenizer_path, cfg.policy.trust_remote_code)
    source.check_lengths(tokenizer, cfg.data)
    with out.writing("the policy's config and tokenizer (base/)"):
        out.save_policy_files(policy_path, tokenizer)
    fixed_set = offline.prepare(cfg, out, tokenizer) if cfg.run.mode == "offline" else None
    return policy_path, tokenizer_path, reward_path, tokenizer, fixed_set


class StartupClock:
    """Seconds of the driver's start-up steps, in order (`lap`), and the pools' own build times, which
    overlap them (a pool builds in the background from its creation until its actors are ready)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now

    def summary(self, **pool_builds: float) -> dict[str, float]:
        return ({"startup/total_s": time.perf_counter() - self.start}
                | {f"startup/{k}_s": v for k, v in self.laps.items()}
                | {f"startup/{k}_build_s": v for k, v in pool_builds.items()})


def build_learners(cfg: OdpoConfig, cluster: Cluster, out: RunDir, initial_policy: str, pad_id: int,
                   incarnation: int = 0) -> LearnerGroup:
    """The learner group, starting from the last committed round's checkpoint (or the initial policy)."""
    policy = out.checkpoint_dir(out.completed - 1) if out.completed else initial_policy
    reference = policy if cfg.learner.reference == "previous" else initial_policy
    learners = cluster.learners(policy, reference, pad_id, incarnation)
    if out.completed and not cfg.learner.reset_optimizer_each_round:
        learners.load_optimizer_states(out.load_optimizer_states(out.completed - 1, cfg.learner.num_ranks))
    return learners
