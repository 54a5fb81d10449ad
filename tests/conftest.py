"""Shared fixtures: tiny models built in code (nothing downloaded) and one local Ray cluster per session.

Where tests run: unit tests use neither Ray nor models; actor tests build tiny random models; tests using
the `ray_cluster` fixture start a real local Ray cluster (`ray.init`); `gpu` tests skip without CUDA.
"""

from __future__ import annotations

import gc
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

REPO = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Poll `condition()` until it returns something truthy, and return that; after `timeout_s` the test
    fails naming `what` and the last value seen (never goes on as if the condition held)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s:.0f}s for {what}; last seen: {value!r}")
        time.sleep(interval_s)


def pytest_collection_modifyitems(config, items):
    slow_files_first(items)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu-marked; run on a GPU machine, see docs/gpu.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def slow_files_first(items: list) -> None:
    """Files with more `slow` tests (end-to-end runs) first, each file's tests together and in their order.

    `make test` hands whole files to two workers (pytest-xdist's loadfile, in this order): a long file started
    last would run alone at the end while the other core idles; unit-test files fill the end instead."""
    def file_of(item) -> str:
        return item.nodeid.split("::", 1)[0]

    slow: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(file_of(item), i)
        slow[file_of(item)] = slow.get(file_of(item), 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: (-slow[file_of(item)], first[file_of(item)]))


@pytest.fixture(autouse=True, scope="module")
def no_process_group_left_behind():
    """After each test file: what it left unreferenced collected, and DeepSpeed's cached process groups
    forgotten once torch.distributed's default group is gone. A group left behind stays: the next file's learner
    joins it, as a learner rank does.

    Test files build learners (DeepSpeed) and vLLM engines in pytest's own process, which production never does
    (each is an actor of its own), and vLLM tears down the default group it shares with the learners behind
    DeepSpeed's back. Run in the order test_real_model.py, test_lora.py, test_actors.py in one process (as a
    `make test` worker may), test_actors.py's learners met DeepSpeed's stale copy of the old group ("Group ... is
    not registered": 8 failed, 5 errors); with this clean-up, all pass."""
    yield
    gc.collect()  # now, not in the middle of the next file's tests
    if "deepspeed" not in sys.modules:
        return
    import torch.distributed as dist
    from deepspeed.utils import groups

    # DeepSpeed's own clean-up after a destroyed world group (deepspeed.comm.destroy_process_group calls it; a
    # private function, in DeepSpeed 0.19 but not every release pyproject allows: without it, nothing is done)
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None and not dist.is_initialized():  # the default group destroyed, or never made
        release(group=None)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> str:
    from actors.models import materialize_builtin

    return materialize_builtin("builtin:tiny-llama", str(tmp_path_factory.mktemp("tiny-policy")), seed=0)


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory) -> str:
    from actors.models import materialize_builtin

    return materialize_builtin("builtin:tiny-llama-rm", str(tmp_path_factory.mktemp("tiny-rm")), seed=1)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the tests that need one (4 logical CPUs on 2 cores)."""
    import ray

    env = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR", "WANDB_MODE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    # fault-injecting reward functions live in the test modules; a PYTHONPATH already set stays behind them
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    from orchestrator.cluster import ray_system_config  # as `odpo run` starts a local cluster

    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False,
             _system_config=ray_system_config())
    yield ray
    ray.shutdown()


RULE_LOOP = ["scorer.type=function", "eval.prompts=0"]
"""configs/tiny.yaml's loop with the rule itself as the reward (not the reward model the default trains first)
and no held-out evaluation: the fast form of the default that most end-to-end tests run. The default's whole
workflow has its own test (test_offline.py)."""


def chat_messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Tell me about item {i}."}]
