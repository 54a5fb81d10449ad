"""Actor pools: each kind of actor in its own placement group, named by pool and rank.

`ActorPool` wraps a plain actor class with `ray.remote` and places one actor per bundle, so a pool's
size and resources never touch another pool's. `LearnerGroup` makes the learner ranks one
torch.distributed group and fans calls out to them, returning object refs (`async_*` / `*_refs`).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.types import Pair, TrainStepStats


class PlacementError(RuntimeError):
    pass


class ActorPool:
    def __init__(self, name: str, cls: type, size: int, cpus: float, gpus: float,
                 args_for_rank: Any, placement_timeout_s: float):
        self.name = name
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        self.pg = placement_group([dict(bundle) for _ in range(size)], strategy="PACK", name=f"odpo-{name}")
        ready, _ = ray.wait([self.pg.ready()], timeout=placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise PlacementError(
                f"pool `{name}`: {size} x {bundle} could not be placed within {placement_timeout_s:.0f}s; "
                f"the cluster has {ray.cluster_resources()} (available now: {ray.available_resources()})")
        remote_cls = ray.remote(cls)
        self.actors = [
            remote_cls.options(
                name=f"{name}-{rank}", num_cpus=cpus, num_gpus=gpus, max_concurrency=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(*args_for_rank(rank))
            for rank in range(size)
        ]

    def wait_ready(self) -> None:
        """Block until every actor's constructor has finished (model loaded, engine built)."""
        ray.get([a.ready.remote() for a in self.actors])

    def __len__(self) -> int:
        return len(self.actors)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)


class LearnerGroup:
    def __init__(self, pool: ActorPool):
        self.pool = pool
        self.ranks = pool.actors

    def setup(self) -> int:
        """Rendezvous the ranks into one process group and build their engines. Returns #parameters."""
        addr, port = ray.get(self.ranks[0].rendezvous_address.remote())
        return ray.get([r.setup.remote(addr, port) for r in self.ranks])[0]

    def start_round(self, round_index: int, total_steps: int) -> None:
        ray.get([r.start_round.remote(round_index, total_steps) for r in self.ranks])

    def async_train_step_refs(self, batch: list[Pair]) -> list[ray.ObjectRef]:
        """Every rank gets its strided slice of the global batch; all ranks step together."""
        w = len(self.ranks)
        return [r.train_step.remote(batch[i::w], batch[0], len(batch)) for i, r in enumerate(self.ranks)]

    def init_nccl_sync(self, generators: list, tensor_parallel_size: int) -> None:
        ray.get([r.init_nccl_sync.remote(generators, tensor_parallel_size) for r in self.ranks])

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

