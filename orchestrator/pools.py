"""Actor pools: each kind of actor in its own placement group, named by pool and rank.

`ActorPool` wraps a plain actor class with `ray.remote` and places one actor per bundle, so a pool's
size and resources never touch another pool's; rollout pools resize between rounds. `LearnerGroup` makes the learner ranks one
torch.distributed group and fans calls out to them, returning object refs (`async_*` / `*_refs`).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.types import Pair, TrainStepStats


class PlacementError(RuntimeError):
    pass


class PoolExhausted(RuntimeError):
    """An actor died or hung and the pool's restart budget is spent (or no room is left for any actor)."""


@dataclass
class Placement:
    """What one actor of a pool reserves, and where it may go."""

    cpus: float
    gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom resources (`ray start --resources`), e.g. {"rollout": 1}."""
    labels: dict[str, str] = field(default_factory=dict)
    """Node label selector (`ray start --labels`), e.g. {"odpo-role": "rollout"}."""
    timeout_s: float = 120.0
    replace_timeout_s: float = 60.0
    """A replacement's wait for room before the pool goes on one actor smaller (its node left)."""

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {}), **self.resources}


@dataclass
class Slot:
    """One actor of a pool and the placement bundle it runs in; `id` names it (`generator-3`)."""

    id: int
    pg: PlacementGroup
    bundle_index: int
    actor: Any = None
    incarnation: int = 0

    def name(self, pool: str) -> str:
        return f"{pool}-{self.id}" + (f".{self.incarnation}" if self.incarnation else "")


def turn_key(slot: Slot) -> str:
    """The name of the turn the actors of `slot`'s colocated bundle take (actors/turns.py)."""
    return f"{slot.pg.id.hex()}-{slot.bundle_index}"


def on_node(node_id: str, fn: Any, *args: Any, timeout_s: float = 30.0) -> Any:
    """`fn(*args)` in a 0-CPU task placed on node `node_id` (the turns' lock files are node-local, and the driver
    need not be on a cluster node). Raises Ray's errors, or TimeoutError when the node does not answer."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    return ray.get(task.remote(*args), timeout=timeout_s)


class ActorPool:
    """Actors of one class, each named `<pool>-<id>`, on their own placement bundles.

    A `gang` pool (the learner) is one placement group placed all at once. Other pools (generators,
    scorers) give every actor its own one-bundle placement group, so they grow and shrink between rounds
    (`resize`) and a dead actor's replacement can land on any node with room; when none has room within
    `placement.replace_timeout_s` (its node left), the pool goes on without it.

    A colocated pool (`shared`: the cluster's placement group for `ray.colocate`) puts actor k into bundle k of
    that group, beside the other colocated pools' actor k, and has it take turns with them on the bundle's
    cores (actors/turns.py); its size is fixed and a replacement goes into the same bundle.
    """

    def __init__(self, name: str, cls: type, size: int, placement: Placement, args_for_rank: Any,
                 max_restarts: int = 0, incarnation: int = 0, call_timeout_s: float | None = None,
                 start_timeout_s: float | None = None, gang: bool = False, shared: PlacementGroup | None = None):
        self.name, self.cls, self.placement, self.args_for_rank, self.gang = name, cls, placement, args_for_rank, gang
        self.shared = shared
        self.max_restarts, self.restarts, self.dropped = max_restarts, 0, 0
        self.no_room_until = 0.0
        self.call_timeout_s, self.start_timeout_s = call_timeout_s, start_timeout_s
        self.weights_ref: ray.ObjectRef | None = None
        """The weights a new or replacement actor loads before it serves (generators; set by the driver)."""
        self.remote_cls = ray.remote(cls)
        self.next_id = 0
        self.slots: list[Slot] = []
        self.lock = threading.Lock()
        """Replacements one at a time: a round, a deferred evaluation and a draw ahead may all see one death."""
        self.closed = False
        """Shut down: nothing is replaced any more (a thread still streaming when the run stops)."""
        self.created_at = time.perf_counter()
        for slot in self._place(size, placement.timeout_s):
            slot.incarnation = incarnation  # a rebuilt learner group's actors get fresh names (learner-0.1)
            self._start(slot)
            self.slots.append(slot)
        self.built_at: list[float] = []
        """When each first actor's constructor had finished (a callback on its `ready` call): the pool's build
        time, which runs while the driver does other set-up."""
        for slot in self.slots:
            slot.actor.ready.remote().future().add_done_callback(lambda _: self.built_at.append(time.perf_counter()))

    def build_seconds(self) -> float:
        """Seconds from the pool's creation until its last first actor was built (NaN while one is not)."""
        return max(self.built_at) - self.created_at if len(self.built_at) == len(self.slots) else float("nan")

    @property
    def actors(self) -> list:
        return [s.actor for s in self.slots]

    def _place(self, count: int, timeout_s: float, ids: list[int] | None = None) -> list[Slot]:
        """Reserve `count` bundles (one group for a gang pool, else one group each) within `timeout_s`."""
        p = self.placement
        new_ids = ids is None
        ids = ids or list(range(self.next_id, self.next_id + count))
        if self.shared is not None:  # colocated: actor k in the shared group's bundle k, placed with the group
            if new_ids:
                self.next_id += count
            return [Slot(i, self.shared, i) for i in ids]
        selector = [dict(p.labels) for _ in range(count)] if p.labels else None
        if self.gang:
            groups = [placement_group([p.bundle() for _ in ids], strategy="PACK", name=f"odpo-{self.name}",
                                      bundle_label_selector=selector)]
            slots = [Slot(i, groups[0], k) for k, i in enumerate(ids)]
        else:
            groups = [placement_group([p.bundle()], name=f"odpo-{self.name}-{i}",
                                      bundle_label_selector=[dict(p.labels)] if p.labels else None) for i in ids]
            slots = [Slot(i, g, 0) for i, g in zip(ids, groups)]
        ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=timeout_s)
        if len(ready) < len(groups):
            for g in groups:
                remove_placement_group(g)
            where = f" on nodes labelled {p.labels}" if p.labels else ""
            raise PlacementError(
                f"pool `{self.name}`: {count} x {p.bundle()}{where} could not be placed within {timeout_s:.0f}s; "
                f"the cluster has {ray.cluster_resources()} (available now: {ray.available_resources()})")
        if new_ids:
            self.next_id += count
        return slots

    def _start(self, slot: Slot) -> None:
        p = self.placement
        slot.actor = self.remote_cls.options(
            name=slot.name(self.name), num_cpus=p.cpus, num_gpus=p.gpus, resources=dict(p.resources) or None,
            max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(slot.pg, placement_group_bundle_index=slot.bundle_index),
        ).remote(*self.args_for_rank(slot.id))
        if self.shared is not None:  # before any other call: every call runs after it, in order
            slot.actor.take_turns.remote(turn_key(slot), slot.name(self.name))

    def _serve(self, slots: list[Slot], what: str) -> None:
        """Wait until new actors are built, then give them the current weights: they serve only after."""
        self.get([s.actor.ready.remote() for s in slots], what, self.start_timeout_s)
        if self.weights_ref is not None:
            self.get([s.actor.load_weights.remote(self.weights_ref) for s in slots], "loading the current weights")

    def resize(self, size: int) -> tuple[int, int]:
        """Grow or shrink to `size` actors between rounds; new actors hold the current weights before they
        serve. Returns (before, after)."""
        if size < 1:
            raise ValueError(f"pool `{self.name}`: size must be >= 1, got {size}")
        if self.shared is not None and size != len(self.slots):
            raise ValueError(f"pool `{self.name}` is colocated (ray.colocate): its actors pair one to one with the "
                             f"other colocated pools', so its size stays {len(self.slots)}")
        before = len(self.slots)
        if size > before:
            new = self._place(size - before, self.placement.timeout_s)
            try:
                for slot in new:
                    self._start(slot)
                self._serve(new, f"starting {len(new)} new actor(s)")
            except BaseException:  # nothing half-started stays behind: the pool keeps its size
                for slot in new:
                    if slot.actor is not None:
                        ray.kill(slot.actor, no_restart=True)
                    remove_placement_group(slot.pg)
                raise
            self.slots += new
        while len(self.slots) > size:
            self._remove(self.slots.pop())
        return before, len(self.slots)

    def _remove(self, slot: Slot) -> None:
        ray.kill(slot.actor, no_restart=True)
        if not self.gang and self.shared is None:
            remove_placement_group(slot.pg)

    def replace(self, slot: Slot, reason: str, failed: Any = None) -> bool:
        """Kill `slot`'s actor (dead or hung) and start a new one holding the current weights, wherever there
        is room. False: no room came within the replace timeout and the pool goes on without it.
        `failed`: the actor handle the caller saw fail; when another caller has replaced it meanwhile (or the
        pool went on without the slot), nothing more is done."""
        assert not self.gang, "a gang pool (the learner group) is rebuilt as a whole, never one actor"
        with self.lock:
            if self.closed:
                raise PoolExhausted(f"pool `{self.name}` is shut down")
            if not any(x is slot for x in self.slots):  # the pool went on without it
                return False
            if failed is not None and slot.actor is not failed:
                return True
            return self._replace(slot, reason)

    def _replace(self, slot: Slot, reason: str) -> bool:
        old_name = slot.name(self.name)
        print(f"odpo: {old_name} {reason}", file=sys.stderr)
        self._remove(slot)
        # Right after a replacement found no room (a node left), its neighbours' replacements look only briefly:
        # losing a node with k actors must not stall the round k times the replace timeout.
        timeout_s = self.placement.replace_timeout_s if time.monotonic() >= self.no_room_until else 1.0
        try:
            (placed,) = self._place(1, timeout_s, ids=[slot.id])
        except PlacementError as e:
            if len(self.slots) == 1:
                raise PoolExhausted(f"pool `{self.name}`: its last actor {old_name} {reason} and {e}") from None
            self.slots.remove(slot)
            self.dropped += 1
            self.no_room_until = time.monotonic() + self.placement.replace_timeout_s
            print(f"odpo: no room for a new {self.name} within {timeout_s:.0f}s (its node left?); going on with "
                  f"{len(self.slots)} {self.name}(s)", file=sys.stderr)
            return False
        if self.restarts >= self.max_restarts:  # only replacements count: an actor given up costs nothing
            if self.shared is None:
                remove_placement_group(placed.pg)
            raise PoolExhausted(f"pool `{self.name}`: actor {old_name} {reason}, and the pool's restart budget "
                                f"({self.max_restarts}) is spent")
        self.restarts += 1
        print(f"odpo: replacing {old_name} ({self.restarts}/{self.max_restarts})", file=sys.stderr)
        dead = slot.actor
        slot.pg, slot.bundle_index, slot.incarnation = placed.pg, placed.bundle_index, slot.incarnation + 1
        self._start(slot)
        new, slot.actor = slot.actor, dead  # other threads see the new actor only once it holds the weights
        try:
            self._serve([dataclasses.replace(slot, actor=new)], "starting")
        finally:  # (a failed start stops the run: shutting the pool down must find the new actor)
            slot.actor = new
        return True

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

    def turn_holder(self, slot: Slot, timeout_s: float = 30.0) -> str:
        """Who holds the turn of `slot`'s colocated bundle (`learner-0 4242`), read by a task on the bundle's
        node; "" when no one does, the pool is not colocated or the node does not answer."""
        if self.shared is None:
            return ""
        from actors.turns import holder_of

        node = ray.util.placement_group_table(slot.pg)["bundles_to_node_id"].get(slot.bundle_index)
        if not node:
            return ""
        try:
            return on_node(node, holder_of, turn_key(slot), timeout_s=timeout_s)
        except (ray.exceptions.RayError, TimeoutError):
            return ""

    def nodes(self) -> dict[str, str]:
        """Actor name -> the id of the node its bundle was placed on."""
        tables = {}
        out = {}
        for s in self.slots:
            key = s.pg.id.hex()
            tables.setdefault(key, placement_group_table(s.pg))
            out[s.name(self.name)] = tables[key]["bundles_to_node_id"].get(s.bundle_index, "")
        return out

    def __len__(self) -> int:
        return len(self.slots)

    def shutdown(self) -> None:
        with self.lock:
            self.closed = True
        for s in self.slots:
            ray.kill(s.actor, no_restart=True)
        if self.shared is None:  # the shared group is the cluster's: it outlives each colocated pool
            for pg in {s.pg.id.hex(): s.pg for s in self.slots}.values():
                remove_placement_group(pg)


class LearnerFailure(RuntimeError):
    """The learner group died or hung: the driver retries the round from the last checkpoint."""


class LearnerGroup:
    def __init__(self, pool: ActorPool, timeout_s: float = float("inf")):
        self.pool = pool
        self.ranks = pool.actors
        self.timeout_s = timeout_s

    def get(self, refs: list[ray.ObjectRef], what: str, timeout_s: float | None = None,
            timeout_key: str = "learner.step_timeout_s") -> list:
        """ray.get on the learner ranks: death or a hang becomes a LearnerFailure (the round is retried)."""
        timeout_s = timeout_s or self.timeout_s
        try:
            return ray.get(refs, timeout=None if timeout_s == float("inf") else timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise LearnerFailure(f"learner {what} took longer than {timeout_key}={timeout_s:.0f}s") from e
        except ray.exceptions.RayActorError as e:
            raise LearnerFailure(f"a learner rank died during {what} ({type(e).__name__})") from e

    def setup(self, timeout_s: float | None = None) -> int:
        """Rendezvous the ranks into one process group and build their engines (within `timeout_s`, an actor's
        start timeout: building the engines is a start, not a step). Returns #parameters."""
        addr, port = self.get([self.ranks[0].rendezvous_address.remote()], "rendezvous", timeout_s,
                              "ray.actor_start_timeout_s")[0]
        return self.get([r.setup.remote(addr, port) for r in self.ranks], "set-up", timeout_s,
                        "ray.actor_start_timeout_s")[0]

    def start_round(self, round_index: int, total_steps: int) -> None:
        self.get([r.start_round.remote(round_index, total_steps) for r in self.ranks], "start of round")

    def matmul_flops(self) -> float:
        """The slowest rank's matmul FLOP/s (Learner.matmul_flops), all ranks at once."""
        return min(self.get([r.matmul_flops.remote() for r in self.ranks], "the matmul rate"))

    def optimizer_states(self) -> list[bytes]:
        return self.get([r.optimizer_state.remote() for r in self.ranks], "optimizer-state export")

    def adapter_files(self) -> dict[str, bytes]:
        """Rank 0's LoRA adapters in PEFT's format, by file name (learner.lora); every rank takes part (ZeRO-3
        gathers them)."""
        return self.get([r.adapter_files.remote() for r in self.ranks], "adapter export")[0]

    def load_optimizer_states(self, payloads: list[bytes]) -> None:
        self.get([r.load_optimizer_state.remote(p) for r, p in zip(self.ranks, payloads)], "optimizer-state load")

    def async_train_step_refs(self, batch: list[Pair]) -> list[ray.ObjectRef]:
        """Every rank gets its strided slice of the global batch; all ranks step together."""
        w = len(self.ranks)
        return [r.train_step.remote(batch[i::w], batch[0], len(batch)) for i, r in enumerate(self.ranks)]

    def async_reference_ref(self, pairs: list[Pair], k: int) -> ray.ObjectRef:
        """Rank k mod world computes the pairs' reference log-probs (no collective: any rank can)."""
        return self.ranks[k % len(self.ranks)].reference_logprobs.remote(pairs)

    def with_reference(self, pairs: list[Pair], chunks: list[int]) -> tuple[list[Pair], float]:
        """The pairs with their reference log-probs, computed as the stream computes them: one call per chunk
        (`chunks[i]`: pair i's chunk; a chunk's pairs are next to each other), on rank chunk mod world; and
        the seconds the ranks spent. The same groups give the same figures as online, to the bit."""
        groups: list[tuple[int, list[Pair]]] = []
        for p, c in zip(pairs, chunks):
            if groups and groups[-1][0] == c:
                groups[-1][1].append(p)
            else:
                groups.append((c, [p]))
        results = self.get([self.async_reference_ref(group, c) for c, group in groups], "the reference log-probs")
        done = [q for (_, group), res in zip(groups, results) for q in attach_reference(group, res)]
        return done, sum(res["seconds"] for res in results) / len(self.ranks)

    def init_nccl_sync(self, generators: list, tensor_parallel_size: int) -> None:
        self.get([r.init_nccl_sync.remote(generators, tensor_parallel_size) for r in self.ranks], "the NCCL set-up")

    def async_send_nccl_refs(self) -> list[ray.ObjectRef]:
        return [r.send_weights_nccl.remote() for r in self.ranks]

    def async_export_refs(self, version: int, freeze: bool = False, adapters: bool = False) -> list[ray.ObjectRef]:
        """All ranks take part in the gather; refs[0] (rank 0) holds the bundle, in the object store once. `freeze`:
        rank 0 keeps a frozen copy of these weights for a deferred evaluation's KL. `adapters`: only the LoRA
        adapters (learner.lora.sync=adapter)."""
        return [r.export_weights.remote(version, freeze, adapters) for r in self.ranks]


def attach_reference(pairs: list[Pair], result: dict) -> list[Pair]:
    """`pairs` with the reference log-probs a learner rank's `reference_logprobs` returned for them."""
    return [dataclasses.replace(p, ref_chosen_logp=c, ref_rejected_logp=r) for p, (c, r) in zip(pairs, result["logps"])]


def combine_step(rank_sums: list[dict]) -> TrainStepStats:
    """Exact mean over the real pairs of all ranks."""
    n = sum(s["pairs"] for s in rank_sums)
    return TrainStepStats(
        loss=sum(s["loss"] for s in rank_sums) / n,
        accuracy=sum(s["correct"] for s in rank_sums) / n,
        chosen_reward=sum(s["chosen_reward"] for s in rank_sums) / n,
        rejected_reward=sum(s["rejected_reward"] for s in rank_sums) / n,
        pairs=n, lr=rank_sums[0]["lr"], grad_norm=rank_sums[0]["grad_norm"],
        seconds=max(s["seconds"] for s in rank_sums), tokens=sum(s.get("tokens", 0) for s in rank_sums),
        computed_tokens=sum(s.get("computed_tokens", 0) for s in rank_sums),
        padded_tokens=sum(s.get("padded_tokens", 0) for s in rank_sums), flops=sum(s.get("flops", 0.0) for s in rank_sums),
    )

