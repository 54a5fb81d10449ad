"""Actor pools: each kind of actor in its own placement group, named by pool and rank.

`ActorPool` wraps a plain actor class with `ray.remote` and places one actor per bundle, so a pool's
size and resources never touch another pool's. `LearnerGroup` makes the learner ranks one
torch.distributed group and fans calls out to them, returning object refs (`async_*` / `*_refs`).
"""

from __future__ import annotations

import sys
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.types import Pair, TrainStepStats


class PlacementError(RuntimeError):
    pass


class PoolExhausted(RuntimeError):
    """An actor died or hung and the pool's restart budget is spent."""


class ActorPool:
    def __init__(self, name: str, cls: type, size: int, cpus: float, gpus: float,
                 args_for_rank: Any, placement_timeout_s: float, max_restarts: int = 0, incarnation: int = 0,
                 call_timeout_s: float | None = None, start_timeout_s: float | None = None):
        self.name = name
        self.cls, self.cpus, self.gpus, self.args_for_rank = cls, cpus, gpus, args_for_rank
        self.max_restarts, self.restarts = max_restarts, 0
        self.call_timeout_s, self.start_timeout_s = call_timeout_s, start_timeout_s
        self.weights_ref: ray.ObjectRef | None = None
        """The weights a replacement actor loads before it serves (generators; set by the driver)."""
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        self.pg = placement_group([dict(bundle) for _ in range(size)], strategy="PACK", name=f"odpo-{name}")
        ready, _ = ray.wait([self.pg.ready()], timeout=placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise PlacementError(
                f"pool `{name}`: {size} x {bundle} could not be placed within {placement_timeout_s:.0f}s; "
                f"the cluster has {ray.cluster_resources()} (available now: {ray.available_resources()})")
        self.remote_cls = ray.remote(cls)
        self.incarnation = [incarnation] * size  # a rebuilt group's actors get fresh names (learner-0.1)
        self.actors = [self._start(rank) for rank in range(size)]

    def _start(self, rank: int):
        suffix = f".{self.incarnation[rank]}" if self.incarnation[rank] else ""
        return self.remote_cls.options(
            name=f"{self.name}-{rank}{suffix}", num_cpus=self.cpus, num_gpus=self.gpus, max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
        ).remote(*self.args_for_rank(rank))

    def replace(self, rank: int, reason: str) -> None:
        """Kill actor `rank` (dead or hung) and start a new one in its bundle that holds the current weights."""
        old_name = f"{self.name}-{rank}" + (f".{self.incarnation[rank]}" if self.incarnation[rank] else "")
        if self.restarts >= self.max_restarts:
            raise PoolExhausted(f"pool `{self.name}`: actor {old_name} {reason}, and the pool's restart budget "
                                f"({self.max_restarts}) is spent")
        self.restarts += 1
        print(f"odpo: {old_name} {reason}; replacing it ({self.restarts}/{self.max_restarts})", file=sys.stderr)
        ray.kill(self.actors[rank], no_restart=True)
        self.incarnation[rank] += 1
        self.actors[rank] = self._start(rank)
        self.get([self.actors[rank].ready.remote()], "starting", self.start_timeout_s)
        if self.weights_ref is not None:
            self.get([self.actors[rank].load_weights.remote(self.weights_ref)], "loading the current weights")

    def get(self, refs: list[ray.ObjectRef], what: str, timeout_s: float | None = None) -> list:
        """ray.get bounded by the pool's call timeout: a pool that does not answer stops the run, named."""
        timeout_s = timeout_s or self.call_timeout_s
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"pool `{self.name}`: no answer within {timeout_s:.0f}s while {what}") from None

    def wait_ready(self) -> None:
        """Block until every actor's constructor has finished (model loaded, engine built)."""
        self.get([a.ready.remote() for a in self.actors], "starting", self.start_timeout_s)

    def __len__(self) -> int:
        return len(self.actors)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)


class LearnerFailure(RuntimeError):
    """The learner group died or hung: the driver retries the round from the last checkpoint."""


class LearnerGroup:
    def __init__(self, pool: ActorPool, timeout_s: float = float("inf")):
        self.pool = pool
        self.ranks = pool.actors
        self.timeout_s = timeout_s

    def get(self, refs: list[ray.ObjectRef], what: str) -> list:
        """ray.get on the learner ranks: death or a hang becomes a LearnerFailure (the round is retried)."""
        try:
            return ray.get(refs, timeout=None if self.timeout_s == float("inf") else self.timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise LearnerFailure(f"learner {what} took longer than learner.step_timeout_s={self.timeout_s:.0f}s") from e
        except ray.exceptions.RayActorError as e:
            raise LearnerFailure(f"a learner rank died during {what} ({type(e).__name__})") from e

    def setup(self) -> int:
        """Rendezvous the ranks into one process group and build their engines. Returns #parameters."""
        addr, port = self.get([self.ranks[0].rendezvous_address.remote()], "rendezvous")[0]
        return self.get([r.setup.remote(addr, port) for r in self.ranks], "set-up")[0]

    def start_round(self, round_index: int, total_steps: int) -> None:
        self.get([r.start_round.remote(round_index, total_steps) for r in self.ranks], "start of round")

    def optimizer_states(self) -> list[bytes]:
        return self.get([r.optimizer_state.remote() for r in self.ranks], "optimizer-state export")

    def load_optimizer_states(self, payloads: list[bytes]) -> None:
        self.get([r.load_optimizer_state.remote(p) for r, p in zip(self.ranks, payloads)], "optimizer-state load")

    def async_train_step_refs(self, batch: list[Pair]) -> list[ray.ObjectRef]:
        """Every rank gets its strided slice of the global batch; all ranks step together."""
        w = len(self.ranks)
        return [r.train_step.remote(batch[i::w], batch[0], len(batch)) for i, r in enumerate(self.ranks)]

    def init_nccl_sync(self, generators: list, tensor_parallel_size: int) -> None:
        self.get([r.init_nccl_sync.remote(generators, tensor_parallel_size) for r in self.ranks], "the NCCL set-up")

    def async_send_nccl_refs(self) -> list[ray.ObjectRef]:
        return [r.send_weights_nccl.remote() for r in self.ranks]

    def async_export_refs(self, version: int) -> list[ray.ObjectRef]:
        """All ranks take part in the gather; refs[0] (rank 0) holds the bundle, in the object store once."""
        return [r.export_weights.remote(version) for r in self.ranks]


def combine_step(rank_sums: list[dict]) -> TrainStepStats:
    """Exact mean over the real pairs of all ranks."""
    n = sum(s["pairs"] for s in rank_sums)
    return TrainStepStats(
        loss=sum(s["loss"] for s in rank_sums) / n,
        accuracy=sum(s["correct"] for s in rank_sums) / n,
        chosen_reward=sum(s["chosen_reward"] for s in rank_sums) / n,
        rejected_reward=sum(s["rejected_reward"] for s in rank_sums) / n,
        pairs=n, lr=rank_sums[0]["lr"], grad_norm=rank_sums[0]["grad_norm"],
        seconds=max(s["seconds"] for s in rank_sums),
    )

