"""The cluster and its pools, built one way for every entry point (`odpo run`, `train-rm`, `eval`).

    with Cluster(cfg) as cluster:        # joins or starts Ray
        generators = cluster.generators(policy_path, tokenizer_path)
        scorers = cluster.scorers(reward_path)
        learners = cluster.learners(policy_path, reference_path, pad_id)
    # on exit: every pool it built is shut down, and Ray too if it was started here

Each pool is in placement groups of its own (`orchestrator/pools.py`) and each actor gets only its own
section of the config. Imports go downward: entry points -> this module -> pools -> actors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from actors.generator import HFGenerator
from actors.learner import Learner
from actors.scorer import Scorer
from actors.settings import LearnerConfig, RolloutPoolConfig, vllm_available, vllm_lora_rank
from actors.user_code import CODE_PATH_ENV
from orchestrator.config import OdpoConfig, colocated_sections, pool_cpus, pool_size, syncs_adapters
from orchestrator.pools import ActorPool, LearnerGroup, Placement, PlacementError, on_node

SHARED_GROUP = "odpo-colocated"
"""The name of ray.colocate's placement group, as the dashboard lists it."""

WORKER_ENV = ("TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE", CODE_PATH_ENV)
"""Passed to every worker so actors find the same caches, stay offline like the driver, and import the user's
functions from the same folders (ODPO_CODE_PATH: the config's folder; relative to each node's copy of the job's
working_dir inside a Ray job)."""


KILL_WORKER_TIMEOUT_MS = 1000
"""How long a raylet waits for a killed worker to exit before it forces it out (Ray's
`kill_worker_timeout_milliseconds`, 5000 by default). A hung actor (stopped, or stuck in native code) never exits
by itself: its replacement waited that long for the cores the hung one still held (5.5 s against 1.5 s on a
2-core Zen 4 AMD EPYC, AVX-512 + avx512_bf16: benchmarks/hung_actor_replacement.py). A healthy actor that is killed exits well
within the second. Set for the local clusters odpo starts; the launch/ scripts export it as
RAY_kill_worker_timeout_milliseconds for the clusters `ray start` makes (a value already in the environment
wins)."""


def ray_system_config() -> dict[str, int]:
    """The `_system_config` of a local cluster odpo starts: KILL_WORKER_TIMEOUT_MS, unless the environment
    already sets RAY_kill_worker_timeout_milliseconds (Ray reads that itself)."""
    if "RAY_kill_worker_timeout_milliseconds" in os.environ:
        return {}
    return {"kill_worker_timeout_milliseconds": KILL_WORKER_TIMEOUT_MS}


def in_ray_job() -> bool:
    """Submitted as a Ray job (`odpo submit`, `ray job submit`): the driver joins the job's cluster."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def start_ray(cfg: OdpoConfig) -> bool:
    """Join or start a cluster; False when Ray was already initialised by the caller.

    As a Ray job (`odpo submit`, `ray job submit`), the driver joins the job's cluster and its runtime_env
    (working_dir, env_vars) is inherited by every actor. A local cluster keeps Ray's token authentication on
    and binds its dashboard to ray.dashboard_host."""
    if ray.is_initialized():
        return False
    in_job = in_ray_job()
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
        context = ray.init(address="local",  # a new cluster even if RAY_ADDRESS or a running one is around
                           num_cpus=cfg.ray.num_cpus or max(needed, os.cpu_count() or 1),
                           include_dashboard=cfg.ray.include_dashboard, dashboard_host=cfg.ray.dashboard_host,
                           runtime_env={"env_vars": env}, _system_config=ray_system_config())
        if cfg.ray.include_dashboard and getattr(context, "dashboard_url", None):
            print(f"odpo: Ray dashboard http://{context.dashboard_url} (it asks for this cluster's token: "
                  f"`ray get-auth-token` prints it)", file=sys.stderr)
    return True


def remove_turn_files_of(pg: PlacementGroup) -> None:
    """The colocated group's turn files (a few bytes per bundle in each node's temp folder), once its pools are
    shut down; a node that does not answer keeps its files, said in one line."""
    from actors.turns import remove_turn_files

    for node in set(placement_group_table(pg)["bundles_to_node_id"].values()):
        try:
            on_node(node, remove_turn_files, pg.id.hex())
        except (ray.exceptions.RayError, TimeoutError) as e:
            print(f"odpo: the colocated pools' turn files stay on node {node[:8]} ({type(e).__name__})",
                  file=sys.stderr)


def resolve_backend(backend: str) -> str:
    """`auto` is vLLM where it is installed, else transformers."""
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    return backend


def generator_class(backend: str) -> type:
    if resolve_backend(backend) == "vllm":
        from actors.vllm_generator import VLLMGenerator  # imports vllm's Python side only when it is used

        return VLLMGenerator
    return HFGenerator


class Cluster:
    """Ray (joined or started) and the pools built on it; closing it shuts them all down."""

    def __init__(self, cfg: OdpoConfig):
        self.cfg = cfg
        self.pools: list[ActorPool] = []
        self.started_ray = False
        self.shared: PlacementGroup | None = None
        """The placement group of ray.colocate's pools: bundle k holds actor k of each (made with the first)."""

    def __enter__(self) -> Cluster:
        self.started_ray = start_ray(self.cfg)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Pools first, each on its own (one that fails to stop does not keep the others alive), then Ray."""
        for pool in self.pools:
            try:
                pool.shutdown()
            except Exception as e:
                print(f"odpo: shutting down pool `{pool.name}`: {e}", file=sys.stderr)
        self.pools.clear()
        self._release_shared()
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def remove(self, pool: ActorPool) -> None:
        """Shut one pool down before the run ends (its resources go to the next one)."""
        self.pools.remove(pool)
        pool.shutdown()
        self._release_shared()

    def colocated(self, name: str) -> PlacementGroup | None:
        """The shared placement group when pool `name` is colocated (ray.colocate), made on first use: one
        bundle per actor pair, reserving the sum of the colocated pools' CPUs and custom resources."""
        sections = colocated_sections(self.cfg)
        if name not in sections:
            return None
        if self.shared is None:
            bundle: dict[str, float] = {"CPU": sum(pool_cpus(s) for s in sections.values())}
            for section in sections.values():
                for key, amount in section.resources.items():
                    bundle[key] = bundle.get(key, 0.0) + amount
            size = pool_size(next(iter(sections.values())))
            labels = dict(next(iter(sections.values())).node_labels)
            pg = placement_group([dict(bundle) for _ in range(size)], strategy="PACK", name=SHARED_GROUP,
                                 bundle_label_selector=[dict(labels) for _ in range(size)] if labels else None)
            timeout_s = self.cfg.ray.placement_timeout_s
            if not ray.wait([pg.ready()], timeout=timeout_s)[0]:
                remove_placement_group(pg)
                raise PlacementError(
                    f"colocated pools {'+'.join(sections)}: {size} x {bundle} could not be placed within "
                    f"{timeout_s:.0f}s; the cluster has {ray.cluster_resources()} (available now: "
                    f"{ray.available_resources()})")
            self.shared = pg
        return self.shared

    def threads_of(self, name: str, section: Any) -> Any:
        """The section an actor of pool `name` is given: a colocated actor computes on its whole bundle's CPUs
        (its thread count), though it reserves only its own share of them."""
        sections = colocated_sections(self.cfg)
        if name not in sections:
            return section
        cpus = sum(pool_cpus(s) for s in sections.values())
        key = "cpus_per_rank" if name == "learner" else "cpus_per_actor"
        return dataclasses.replace(section, **{key: cpus})

    def _release_shared(self) -> None:
        """The shared group goes once no colocated pool is left in it (`odpo train-rm` drops its sampling pool
        before the reward model trains)."""
        if self.shared is not None and not any(p.shared is not None for p in self.pools):
            remove_turn_files_of(self.shared)
            remove_placement_group(self.shared)
            self.shared = None

    def placement(self, section: RolloutPoolConfig | LearnerConfig) -> Placement:
        """What one actor of the section's pool reserves, and where it may go."""
        if isinstance(section, LearnerConfig):
            cpus, gpus = section.cpus_per_rank, section.gpus_per_rank
        else:
            cpus, gpus = section.cpus_per_actor, section.gpus_per_actor
        return Placement(cpus, gpus, dict(section.resources), dict(section.node_labels),
                         self.cfg.ray.placement_timeout_s, self.cfg.ray.replace_placement_timeout_s)

    def nodes(self) -> dict[str, dict[str, str]]:
        """Pool -> actor name -> the node it was placed on (placement.json)."""
        return {p.name: p.nodes() for p in self.pools}

    def generators(self, policy_path: str, tokenizer_path: str) -> ActorPool:
        g, p = self.cfg.generator, self.cfg.policy
        max_prompt_length = self.cfg.data.max_prompt_length
        actor_g = self.threads_of("generator", g)
        # LoRA runs that sync only their adapters: engines with vLLM's LoRA support on the base (`policy_path`)
        rank = self.cfg.learner.lora.rank
        max_lora_rank = vllm_lora_rank(rank) if syncs_adapters(self.cfg) else 0
        return self._add(ActorPool(
            "generator", generator_class(g.backend), g.num_actors, self.placement(g),
            lambda r: (actor_g, policy_path, tokenizer_path, p.dtype, max_prompt_length, p.trust_remote_code,
                       f"generator-{r}", max_lora_rank),
            g.max_restarts, call_timeout_s=g.call_timeout_s, start_timeout_s=self.cfg.ray.actor_start_timeout_s,
            shared=self.colocated("generator")))

    def scorers(self, reward_path: str | None) -> ActorPool:
        s = self.cfg.scorer
        actor_s = self.threads_of("scorer", s)
        return self._add(ActorPool(
            "scorer", Scorer, s.num_actors, self.placement(s), lambda r: (actor_s, reward_path, f"scorer-{r}"),
            s.max_restarts, call_timeout_s=s.call_timeout_s, start_timeout_s=self.cfg.ray.actor_start_timeout_s,
            shared=self.colocated("scorer")))

    def learners(self, policy_path: str, reference_path: str, pad_id: int, incarnation: int = 0) -> LearnerGroup:
        """The DPO learner ranks on `policy_path`, with `reference_path`'s log-probs as the reference."""
        lc, p = self.threads_of("learner", self.cfg.learner), self.cfg.policy
        return self.learner_group("learner", Learner, lambda r: (lc, policy_path, p.dtype, r, lc.num_ranks, pad_id,
                                                                 p.trust_remote_code, reference_path), incarnation)

    def learner_group(self, name: str, cls: type, args_for_rank: Any, incarnation: int = 0) -> LearnerGroup:
        """`learner.num_ranks` actors of `cls` placed together, joined into one torch.distributed group; in the
        colocated bundles when ray.colocate lists the learner (the DPO learner's, or before it the reward
        model's, which takes its place there while it trains)."""
        lc = self.cfg.learner
        pool = self._add(ActorPool(name, cls, lc.num_ranks, self.placement(lc), args_for_rank,
                                   incarnation=incarnation, gang=True, shared=self.colocated("learner")))
        group = LearnerGroup(pool, lc.step_timeout_s)
        group.setup(self.cfg.ray.actor_start_timeout_s)
        return group

    def _add(self, pool: ActorPool) -> ActorPool:
        self.pools.append(pool)
        return pool
