"""Live metrics on Ray's Prometheus endpoint (`ray.util.metrics`), recorded by the driver.

Every node's metrics agent serves them at `http://NODE:METRICS_EXPORT_PORT/metrics` with Ray's `ray_`
prefix, tagged with the run name; Ray's Grafana dashboards and any Prometheus scrape pick them up:

    ray_odpo_round                      round in progress (0-based)
    ray_odpo_weight_version             policy version the generators hold
    ray_odpo_prompts_total{stage}       prompts generated / scored / trained (trained: pairs) so far
    ray_odpo_tokens_per_second{pool}    this round's throughput: generator (new tokens), scorer (response
                                        tokens scored), learner (prompt + chosen + rejected tokens trained)
    ray_odpo_queue_depth{pool}          work waiting at or running on a pool (chunks; learner: pairs waiting
                                        for a full batch or in training steps)
    ray_odpo_pool_actors{pool}          actors in each pool
    ray_odpo_reward_mean, ray_odpo_loss the last completed round's mean reward and DPO loss
    ray_odpo_driver_cpu_seconds         the driver process's own CPU seconds in the last round
    ray_odpo_driver_rss_megabytes       the driver process's resident memory at the last commit

Ray exports what was recorded every few seconds (about 10 s), so a scrape sees values that recent.
"""

from __future__ import annotations

import time

POOLS = ("generator", "scorer", "learner")
STAGES = ("generated", "scored", "trained")


class Telemetry:
    """Gauges and counters of one run; cheap to call often (queue depths are recorded at most every 0.5 s)."""

    def __init__(self, run_name: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"run": run_name}
        self.round = Gauge("odpo_round", "Round in progress (0-based).", tag_keys=("run",))
        self.weight_version = Gauge("odpo_weight_version", "Policy version held by the generators.", tag_keys=("run",))
        self.prompts = Counter("odpo_prompts", "Prompts through each stage (trained: pairs).", tag_keys=("run", "stage"))
        self.tokens_per_s = Gauge("odpo_tokens_per_second", "This round's tokens per second in each pool.",
                                  tag_keys=("run", "pool"))
        self.queue = Gauge("odpo_queue_depth", "Work waiting at or running on each pool.", tag_keys=("run", "pool"))
        self.actors = Gauge("odpo_pool_actors", "Actors in each pool.", tag_keys=("run", "pool"))
        self.reward = Gauge("odpo_reward_mean", "Mean reward of the last completed round.", tag_keys=("run",))
        self.loss = Gauge("odpo_loss", "Mean DPO loss of the last completed round.", tag_keys=("run",))
        self.driver_cpu = Gauge("odpo_driver_cpu_seconds", "The driver's CPU seconds in the last round.",
                                tag_keys=("run",))
        self.driver_rss = Gauge("odpo_driver_rss_megabytes", "The driver's resident memory.", tag_keys=("run",))
        self._last_queue = 0.0
        self._cpu_at = time.process_time()

    def _t(self, **extra: str) -> dict[str, str]:
        return {**self.tags, **extra}

    def start_round(self, round_index: int, version: int, pool_sizes: dict[str, int]) -> None:
        self.round.set(round_index, tags=self._t())
        self.weight_version.set(version, tags=self._t())
        for pool, size in pool_sizes.items():
            self.actors.set(size, tags=self._t(pool=pool))

    def count(self, stage: str, n: int) -> None:
        if n:
            self.prompts.inc(n, tags=self._t(stage=stage))

    def throughput(self, tokens_per_s: dict[str, float]) -> None:
        for pool, value in tokens_per_s.items():
            self.tokens_per_s.set(value, tags=self._t(pool=pool))

    def queues(self, depths: dict[str, int], force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last_queue >= 0.5:
            self._last_queue = now
            for pool, depth in depths.items():
                self.queue.set(depth, tags=self._t(pool=pool))

    def driver_usage(self) -> dict[str, float]:
        """The driver process's CPU seconds (all its threads) since the last call (or the session's start), and
        its resident memory now: a driver that grows with the rounds shows here (`driver/*` in each round line)."""
        import psutil

        now = time.process_time()
        usage = {"driver/cpu_s": now - self._cpu_at, "driver/rss_mb": psutil.Process().memory_info().rss / 2**20}
        self._cpu_at = now
        self.driver_cpu.set(usage["driver/cpu_s"], tags=self._t())
        self.driver_rss.set(usage["driver/rss_mb"], tags=self._t())
        return usage

    def end_round(self, metrics: dict) -> None:
        self.weight_version.set(metrics["weight_version"], tags=self._t())
        self.reward.set(metrics["reward/mean"], tags=self._t())
        self.loss.set(metrics["train/loss"], tags=self._t())
        self.queues(dict.fromkeys(POOLS, 0), force=True)
