"""Pools on their own resources, resizing, the scale control file, progress lines for `odpo status`, the
per-round plot, and `odpo submit`'s checks before anything is uploaded."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import multiprocessing
import os
import time

import pytest
from conftest import REPO, wait_for

from actors.turns import TakesTurns, Turns, holder_of, in_turn, remove_turn_files
from orchestrator.config import ConfigError, load_config
from orchestrator.control import SCALE_FILE, read_scale_request, request_scale, take_scale_request
from orchestrator.plots import PLOT_FILE, plot_rounds
from orchestrator.pools import ActorPool, LearnerFailure, Placement, PlacementError, turn_key
from orchestrator.progress import RoundProgress, parse_line


class Holder:
    """A minimal actor with the methods a pool calls: `ready`, `load_weights`, `weight_version`."""

    def __init__(self, name: str):
        self.name, self.version = name, 0

    def ready(self) -> str:
        return self.name

    def load_weights(self, version: int) -> int:
        self.version = version
        return version

    def weight_version(self) -> int:
        return self.version


def test_resize_grows_with_current_weights_and_shrinks_placement_groups(ray_cluster):
    from ray.util import placement_group_table

    pool = ActorPool("holder", Holder, 1, Placement(0.25, timeout_s=30), lambda r: (f"holder-{r}",))
    try:
        pool.weights_ref = ray_cluster.put(7)  # what the driver sets after each sync
        assert pool.resize(3) == (1, 3)
        assert ray_cluster.get([a.weight_version.remote() for a in pool.actors]) == [0, 7, 7]  # new ones loaded
        assert [ray_cluster.get_actor(f"holder-{i}") is not None for i in range(3)] == [True] * 3
        assert len({s.pg.id for s in pool.slots}) == 3  # one placement group per actor
        removed = pool.slots[1:]
        assert pool.resize(1) == (3, 1)
        for slot in removed:
            assert placement_group_table(slot.pg)["state"] == "REMOVED"
        with pytest.raises(ValueError):
            ray_cluster.get_actor("holder-2")
        assert pool.resize(2) == (1, 2)
        assert ray_cluster.get(pool.actors[1].ready.remote()) == "holder-3"  # a fresh name, never reused
        with pytest.raises(ValueError, match="size must be >= 1"):
            pool.resize(0)
    finally:
        pool.shutdown()


def test_custom_resources_that_no_node_offers_fail_placement_naming_them(ray_cluster):
    with pytest.raises(PlacementError, match=r"pool `holder-x`: 1 x \{'CPU': 0.25, 'rollout': 1.0\} could not be placed"):
        ActorPool("holder-x", Holder, 1, Placement(0.25, resources={"rollout": 1.0}, timeout_s=2),
                  lambda r: (f"holder-x-{r}",))
    with pytest.raises(PlacementError, match=r"on nodes labelled \{'odpo-role': 'rollout'\}"):
        ActorPool("holder-y", Holder, 1, Placement(0.25, labels={"odpo-role": "rollout"}, timeout_s=2),
                  lambda r: (f"holder-y-{r}",), gang=True)
    # nothing held: Ray frees removed placement groups asynchronously
    wait_for(lambda: ray_cluster.available_resources().get("CPU") == ray_cluster.cluster_resources()["CPU"], 20,
             f"every CPU free again (available: {ray_cluster.available_resources()})")


def test_placement_config_is_validated(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/tiny.yaml", ["generator.resources={rollout: 1}", "learner.node_labels={odpo-role: train}"])
    assert cfg.generator.resources == {"rollout": 1.0} and cfg.learner.node_labels == {"odpo-role": "train"}
    for override, key in (("scorer.resources={GPU: 1}", "scorer.resources.GPU"),
                          ("generator.resources={rollout: 0}", "generator.resources.rollout"),
                          ("learner.node_labels={odpo-role: ''}", "learner.node_labels.odpo-role"),
                          ("ray.replace_placement_timeout_s=0", "ray.replace_placement_timeout_s")):
        with pytest.raises(ConfigError) as e:
            load_config("configs/tiny.yaml", [override])
        assert e.value.key == key


def test_scale_requests_merge_and_are_taken_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an odpo run directory"):
        request_scale(str(tmp_path), {"generator": 2})
    (tmp_path / "config.yaml").write_text("run: {}\n")
    assert request_scale(str(tmp_path), {"generator": 2}) == {"generator": 2}
    assert request_scale(str(tmp_path), {"scorer": 3}) == {"generator": 2, "scorer": 3}
    assert request_scale(str(tmp_path), {"generator": 4}) == {"generator": 4, "scorer": 3}
    for bad in ({"learner": 2}, {"generator": 0}):
        with pytest.raises(ValueError):
            request_scale(str(tmp_path), bad)
    assert take_scale_request(str(tmp_path)) == {"generator": 4, "scorer": 3}
    assert not (tmp_path / SCALE_FILE).exists()
    assert take_scale_request(str(tmp_path)) is None and read_scale_request(str(tmp_path)) is None
    assert os.listdir(tmp_path / "control") == ["scale.json.lock"]  # nothing else left behind


def test_a_request_older_than_the_driver_or_broken_is_dropped_not_applied(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("run: {}\n")
    request_scale(str(tmp_path), {"generator": 2})
    assert take_scale_request(str(tmp_path), written_after=time.time() + 5) is None
    assert "written before this driver started" in capsys.readouterr().err
    assert not (tmp_path / SCALE_FILE).exists()
    request_scale(str(tmp_path), {"generator": 2})
    assert take_scale_request(str(tmp_path), written_after=time.time() - 60) == {"generator": 2}  # a fresh one
    for broken in ("{not json", '{"generator": 0}', '["generator"]'):
        (tmp_path / SCALE_FILE).write_text(broken)
        assert take_scale_request(str(tmp_path)) is None
        assert "ignoring" in capsys.readouterr().err


def test_cli_scale_on_a_run_directory(tmp_path):
    from orchestrator.cli import main

    (tmp_path / "config.yaml").write_text("run: {}\n")
    assert main(["scale", str(tmp_path), "--generators", "3"]) == 0
    assert json.loads((tmp_path / SCALE_FILE).read_text()) == {"generator": 3}
    assert main(["scale", str(tmp_path)]) == 2  # nothing asked
    assert main(["scale", str(tmp_path), "--scorers", "-1"]) == 2


def test_progress_lines_parse_back_for_status():
    out = io.StringIO()
    progress = RoundProgress(1, 6, 64, interval_s=0.0, stream=out)
    progress.add("generated", 8, tokens=400)
    progress.add("scored", 8, tokens=400)
    progress.add("trained", 4, tokens=900)
    progress.set_stage("epochs")
    parsed = parse_line("noise\n" + out.getvalue() + "more noise\n")
    assert parsed is not None
    assert {k: parsed[k] for k in ("round", "rounds", "stage", "generated", "scored", "trained", "prompts")} == {
        "round": 2, "rounds": 6, "stage": "epochs", "generated": 8, "scored": 8, "trained": 4, "prompts": 64}
    assert parsed["gen_tps"] > 0 and parsed["train_tps"] > parsed["score_tps"]  # 900 vs 400 tokens, same clock
    assert parse_line("nothing here") is None


def test_round_plot_is_written(tmp_path):
    history = [{"round": r, "reward/mean": 0.2 + 0.1 * r, "reward/min": 0.0, "reward/max": 1.0,
                "train/loss": 0.69 - 0.05 * r, "train/accuracy": 0.5 + 0.1 * r, "gen/tokens_per_s": 1000.0,
                "score/tokens_per_s": 900.0, "train/tokens_per_s": None} for r in range(3)]
    path = plot_rounds(history, str(tmp_path))
    assert path == os.path.join(str(tmp_path), PLOT_FILE)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(os.path.dirname(path)) if p != "rounds.png"]  # no temporary left


def test_submit_refuses_a_config_outside_the_working_dir_and_bad_values_before_uploading(tmp_path, monkeypatch):
    from orchestrator import jobs

    monkeypatch.chdir(REPO)
    outside = tmp_path / "c.yaml"
    outside.write_text("run: {rounds: 1}\n")
    # an unreachable address: these must fail before any connection is tried
    with pytest.raises(ValueError, match="outside the working directory"):
        jobs.submit(str(outside), [], "http://127.0.0.1:9")
    with pytest.raises(ConfigError) as e:
        jobs.submit("configs/tiny.yaml", ["learner.lr=-1"], "http://127.0.0.1:9")
    assert e.value.key == "learner.lr"
    from orchestrator.cli import main  # the CLI too: the config error, not a failed connection

    assert main(["submit", "configs/tiny.yaml", "learner.lr=-1", "--address", "http://127.0.0.1:9"]) == 2


def test_submit_leaves_the_machine_checks_to_the_cluster(tmp_path, monkeypatch):
    """A config for a GPU cluster validates from a machine without vLLM or the cluster's paths; the job
    checks them where it runs (`odpo run` there)."""
    from orchestrator import jobs

    monkeypatch.chdir(REPO)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "vllm" else object())
    remote = ["generator.backend=vllm", "policy.path=/cluster/models/llama-3-8b", "data.path=/cluster/data/p.jsonl"]
    with pytest.raises(ConfigError, match="vllm is not installed"):
        load_config("configs/tiny.yaml", remote)  # here, `odpo run` would need them
    submitted = {}
    monkeypatch.setattr(jobs, "client", lambda address: object())  # stands in for the cluster's job server

    def record(c, **kw):
        submitted.update(kw)
        return "job-1"

    monkeypatch.setattr(jobs, "submit_when_ready", record)
    assert jobs.submit("configs/tiny.yaml", remote, "http://127.0.0.1:9") == 0
    assert "exec python -m orchestrator.cli run configs/tiny.yaml generator.backend=vllm" in submitted["entrypoint"]


def test_a_job_under_another_python_says_what_to_do(tmp_path):
    """The entrypoint under a `python` that lacks odpo's dependencies (a cluster started as `.venv/bin/ray
    start` without the venv on PATH; here an interpreter without site-packages stands in for it) fails with
    what to do; under the environment's own python it runs odpo. Both through /bin/sh, as Ray runs it."""
    import subprocess
    import sys

    from orchestrator.jobs import job_entrypoint

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "python").write_text(f'#!/bin/sh\nexec {os.path.realpath(sys.executable)} -S "$@"\n')
    (bare / "python").chmod(0o755)
    command = job_entrypoint(["validate", "configs/tiny.yaml", "run.name=under_the_right_python"])
    env = {**os.environ, "PATH": f"{bare}:/usr/bin:/bin"}
    wrong = subprocess.run(command, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1
    assert f"runs python from the head node's PATH ({bare}/python)" in wrong.stderr
    assert "Start every node with that environment's bin first on PATH" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    env["PATH"] = f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"
    right = subprocess.run(command, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert right.returncode == 0, right.stderr[-2000:]
    assert "name: under_the_right_python" in right.stdout


def test_runtime_env_ships_the_repo_without_heavy_folders(tmp_path, monkeypatch):
    from orchestrator.jobs import runtime_env

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", ".cache/ext")  # a path on this machine: not sent
    monkeypatch.setenv("WANDB_API_KEY", "secret")  # a secret: not put where the job API shows it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra = tmp_path / "env.yaml"
    extra.write_text("env_vars: {WANDB_MODE: online, FOO: 1}\nexcludes: [data/big]\n")
    env = runtime_env(str(REPO), str(extra))
    assert env["working_dir"] == str(REPO)
    assert {".venv", "runs", ".cache", ".git", "data/big"} <= set(env["excludes"])
    assert env["env_vars"]["WANDB_MODE"] == "online" and env["env_vars"]["FOO"] == "1"
    assert "TORCH_EXTENSIONS_DIR" not in env["env_vars"] and "WANDB_API_KEY" not in env["env_vars"]
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "30"


def test_driver_applies_a_scale_request_and_survives_one_the_cluster_cannot_meet(ray_cluster, tmp_path, capsys):
    from orchestrator.control import apply_scale_request

    (tmp_path / "config.yaml").write_text("run: {}\n")
    gens = ActorPool("holder-g", Holder, 1, Placement(0.25, timeout_s=2), lambda r: (f"holder-g-{r}",))
    scorers = ActorPool("holder-s", Holder, 1, Placement(0.25, timeout_s=2), lambda r: (f"holder-s-{r}",))
    try:
        request_scale(str(tmp_path), {"generator": 40, "scorer": 2})  # 40 x 0.25 CPU: more than the cluster has
        apply_scale_request(str(tmp_path), gens, scorers, nccl=False)
        assert (len(gens), len(scorers)) == (1, 2)
        assert "cannot resize the holder-g pool to 40, going on with 1" in capsys.readouterr().err
        assert take_scale_request(str(tmp_path)) is None  # taken, not applied twice
        apply_scale_request(str(tmp_path), gens, scorers, nccl=False)  # nothing pending: nothing changes
        assert (len(gens), len(scorers)) == (1, 2)
    finally:
        gens.shutdown()
        scorers.shutdown()


class Sleeper:
    """An actor whose call takes as long as it is told: late, stopped (SIGSTOP) or killed by the test."""

    def __init__(self, name: str):
        self.name = name

    def ready(self) -> str:
        return self.name

    def pid(self) -> int:
        return os.getpid()

    def work(self, seconds: float) -> tuple[int, float]:
        time.sleep(seconds)
        return os.getpid(), seconds


def test_map_replaces_dead_and_stopped_actors_but_not_late_ones(ray_cluster):
    """map_calls (the held-out evaluation's calls): results in item order whoever answered; an actor past its
    call timeout gets a last look (LAST_LOOK_S) before it is called hung, so a late answer is no fault."""
    import signal

    from orchestrator.streaming import map_calls

    pool = ActorPool("sleeper", Sleeper, 2, Placement(0.25, timeout_s=30), lambda r: (f"sleeper-{r}",),
                     max_restarts=5, call_timeout_s=1.0, start_timeout_s=60)
    try:
        pool.wait_ready()
        pids = ray_cluster.get([a.pid.remote() for a in pool.actors])
        late = map_calls(pool, lambda a, s: a.work.remote(s), [1.8, 0.1, 0.1], "working late")
        assert late == [(pids[0], 1.8), (pids[1], 0.1), (pids[0], 0.1)] and pool.restarts == 0
        os.kill(pids[1], signal.SIGSTOP)
        stopped = map_calls(pool, lambda a, s: a.work.remote(s), [0.1, 0.2, 0.3], "working")
        assert [s for _, s in stopped] == [0.1, 0.2, 0.3] and pool.restarts == 1  # the stopped one was replaced
        assert pids[1] not in {pid for pid, _ in stopped}  # its item was answered by another actor
        now = ray_cluster.get([a.pid.remote() for a in pool.actors])
        assert now[0] == pids[0] and now[1] not in pids
        os.kill(pids[0], signal.SIGKILL)
        dead = map_calls(pool, lambda a, s: a.work.remote(s), [0.1, 0.1], "working")
        assert [s for _, s in dead] == [0.1, 0.1] and pool.restarts == 2
        assert pids[0] not in {pid for pid, _ in dead}
    finally:
        pool.shutdown()


KILL_TIMEOUT_SEEN = """
import ray
from orchestrator.cluster import start_ray
from orchestrator.config import load_config

assert start_ray(load_config("configs/tiny.yaml", ["ray.include_dashboard=false"]))


@ray.remote(num_cpus=0)
def seen() -> int:
    return ray._raylet.Config.kill_worker_timeout_milliseconds()


print("seen", ray.get(seen.remote(), timeout=120))
ray.shutdown()
"""


def test_clusters_odpo_starts_force_a_killed_worker_out_after_a_second(monkeypatch):
    """A hung actor never exits when killed: the raylet forces it out after kill_worker_timeout_milliseconds,
    and its replacement waits that long for its cores (benchmarks/hung_actor_replacement.py). The local
    cluster `odpo run` starts (start_ray, in a process of its own) sets odpo's value, which its workers read;
    a value already in the environment is left to Ray."""
    import subprocess
    import sys

    from orchestrator.cluster import KILL_WORKER_TIMEOUT_MS, ray_system_config

    monkeypatch.setenv("RAY_kill_worker_timeout_milliseconds", "3000")
    assert ray_system_config() == {}  # Ray reads the variable itself
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_kill_worker_timeout_milliseconds")}
    done = subprocess.run([sys.executable, "-c", KILL_TIMEOUT_SEEN], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert KILL_WORKER_TIMEOUT_MS != 5000 and done.stdout.split()[-2:] == ["seen", str(KILL_WORKER_TIMEOUT_MS)]


class Turner(TakesTurns):
    """A colocated pool's actor: `work` holds the bundle's turn while it runs (as generate or train_step do)."""

    def __init__(self, name: str):
        self.name = name

    def ready(self) -> str:
        return self.name

    def load_weights(self, version: int) -> int:
        return version

    @in_turn
    def work(self, seconds: float) -> tuple[float, float, int]:
        start = time.time()
        time.sleep(seconds)
        return start, time.time(), os.getpid()


def overlaps(a: list[tuple], b: list[tuple]) -> list[tuple]:
    return [(x, y) for x in a for y in b if x[0] < y[1] and y[0] < x[1]]


def hold_turn(key: str, seconds: float, out, depth: int = 1, barrier=None) -> None:
    """In a process of its own: hold the turn `seconds` (re-entered `depth` times), report the interval; with a
    barrier, ask for the turn once every process has started."""
    turns = Turns(key)
    if barrier is not None:
        barrier.wait(30)
    with contextlib.ExitStack() as stack:
        for _ in range(depth):
            stack.enter_context(turns)
        start = time.time()
        time.sleep(seconds)
        out.put((start, time.time(), turns.waited_s))


def hold_turn_forever(key: str, out) -> None:
    with Turns(key, "generator-3"):
        out.put("holding")
        time.sleep(600)


def test_turns_are_exclusive_across_processes_reentrant_and_freed_when_the_holder_dies(tmp_path):
    ctx = multiprocessing.get_context("fork")
    key = f"test-{os.getpid()}-{time.time_ns()}"
    out = ctx.Queue()
    barrier = ctx.Barrier(4)  # all four ask at once, however long each took to start on a busy machine
    procs = [ctx.Process(target=hold_turn, args=(key, 0.3, out, depth, barrier)) for depth in (1, 2, 1, 3)]
    for p in procs:
        p.start()
    spans = sorted(out.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans  # one at a time
    assert sum(waited for _, _, waited in spans) > 3 * 0.3  # three waited for the first, two of them longer
    # a holder killed mid-turn (SIGKILL: no clean-up runs) frees the cores at once
    holder = ctx.Process(target=hold_turn_forever, args=(key, out))
    holder.start()
    assert out.get(timeout=30) == "holding"
    assert holder_of(key) == f"generator-3 {holder.pid}"  # who holds a bundle can be read on its node
    holder.kill()
    holder.join(10)
    assert holder_of(key) == ""  # a dead holder is not named: its lock is gone with it
    turns = Turns(key, "learner-0")
    start = time.time()
    with turns:
        assert time.time() - start < 5
        assert holder_of(key) == f"learner-0 {os.getpid()}"
    assert holder_of(key) == ""
    # re-entered, the turn is held until the outermost exit
    with turns:
        with turns:
            pass
        fd = os.open(turns.path, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free after it
    os.close(fd)
    assert remove_turn_files(key.rsplit("-", 1)[0]) == 1 and not os.path.exists(turns.path)  # what a run leaves


def test_colocated_pools_share_bundles_take_turns_and_replace_in_place(ray_cluster):
    """Two pools in one shared placement group: actor k of each in bundle k; their calls never run at once
    (pools apart would run them side by side), a replacement goes into the same bundle and takes turns too,
    the size is fixed, and shutting a pool down leaves the shared group to its owner."""
    from ray.util import placement_group, placement_group_table, remove_placement_group

    shared = placement_group([{"CPU": 0.5}, {"CPU": 0.5}], name="test-colocated")
    ray_cluster.get(shared.ready(), timeout=30)
    pools = [ActorPool(name, Turner, 2, Placement(0.25, timeout_s=30), lambda r, n=name: (f"{n}-{r}",),
                       max_restarts=1, start_timeout_s=60, shared=shared) for name in ("turner-a", "turner-b")]
    try:
        for pool in pools:
            pool.wait_ready()
            assert [(s.pg.id, s.bundle_index) for s in pool.slots] == [(shared.id, 0), (shared.id, 1)]

        def side_by_side() -> list[list[tuple]]:
            refs = [[a.work.remote(0.25) for _ in range(3)] for pool in pools for a in pool.actors]
            return [ray_cluster.get(r) for r in refs]  # a-0, a-1, b-0, b-1

        a0, a1, b0, b1 = side_by_side()
        assert overlaps(a0, b0) == [] and overlaps(a1, b1) == []  # the same bundle: one at a time
        assert overlaps(a0 + b0, a1 + b1)  # other bundles: at the same time (whichever pair the turns gave)
        slot = pools[0].slots[0]
        ray_cluster.kill(slot.actor, no_restart=True)
        assert pools[0].replace(slot, "was killed") is True
        assert (slot.pg.id, slot.bundle_index, slot.incarnation) == (shared.id, 0, 1)
        a0, _, b0, _ = side_by_side()
        assert overlaps(a0, b0) == []
        with pytest.raises(ValueError, match="colocated"):
            pools[1].resize(3)
        pools[0].shutdown()
        assert placement_group_table(shared)["state"] != "REMOVED"
    finally:
        for pool in pools:
            pool.shutdown()
        remove_placement_group(shared)
        remove_turn_files(shared.id.hex())


def test_an_evaluation_call_waiting_for_a_learners_turn_waits_on_and_replaces_no_one(ray_cluster, capsys):
    """map_calls (the held-out evaluation, run beside a round): a colocated actor past its call timeout only
    because learner-0 holds their bundle's turn is not replaced (the round blames the learner, or its step
    timeout does); its calls finish once the learner lets go. Before, it was replaced, and its replacement waited
    for the same turn."""
    from ray.util import placement_group, remove_placement_group

    from orchestrator.streaming import map_calls

    shared = placement_group([{"CPU": 0.5}], name="test-colocated-wait")
    ray_cluster.get(shared.ready(), timeout=30)
    pools = [ActorPool(name, Turner, 1, Placement(0.25, timeout_s=30), lambda r, n=name: (f"{n}-{r}",),
                       max_restarts=2, call_timeout_s=1.0, start_timeout_s=60, shared=shared)
             for name in ("learner", "turner")]
    learner, neighbour = pools
    try:
        for pool in pools:
            pool.wait_ready()
        pid = ray_cluster.get(neighbour.actors[0].work.remote(0))[2]
        held = learner.actors[0].work.remote(5.0)
        while holder_of(turn_key(learner.slots[0])).split(" ")[0] != "learner-0":
            time.sleep(0.01)
        out = map_calls(neighbour, lambda a, s: a.work.remote(s), [0.1, 0.1], "judging")
        learner_start, learner_end, _ = ray_cluster.get(held)
        assert [p for _, _, p in out] == [pid, pid] and neighbour.restarts == 0
        assert all(start >= learner_end for start, _, _ in out)  # they ran once the learner let go
        assert "turner-0 has waited 1s for the cores learner-0 holds while judging (ray.colocate)" \
            in capsys.readouterr().err
        # with nothing else to blame it (a resumed run's initial evaluation), a learner holding the turn past
        # learner.step_timeout_s is hung: the calls stop, naming it, and still no neighbour is replaced
        held = learner.actors[0].work.remote(8.0)
        wait_for(lambda: holder_of(turn_key(learner.slots[0])).startswith("learner-0 "), 30, "learner-0's turn")
        with pytest.raises(LearnerFailure, match=r"learner-0 has held the cores turner-0 waits for while judging "
                                                 r"longer than learner.step_timeout_s=3s"):
            map_calls(neighbour, lambda a, s: a.work.remote(s), [0.1], "judging", turn_timeout_s=3.0)
        assert neighbour.restarts == 0
        ray_cluster.get(held)
    finally:
        for pool in pools:
            pool.shutdown()
        remove_placement_group(shared)
        remove_turn_files(shared.id.hex())


def test_colocation_config_is_validated(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/tiny.yaml", ["ray.colocate=[generator,learner]"])
    assert cfg.ray.colocate == ["generator", "learner"]
    # make real's task colocates by default; an empty list gives each pool cores of its own
    assert load_config("examples/plurals/task.yaml", []).ray.colocate == ["generator", "learner"]
    assert load_config("examples/plurals/task.yaml", ["ray.colocate=[]"]).ray.colocate == []
    for overrides, key, message in (
            (["ray.colocate=[generator,trainer]"], "ray.colocate", "unknown pool"),
            (["ray.colocate=[learner]"], "ray.colocate", "at least two"),
            (["ray.colocate=[learner,learner]"], "ray.colocate", "listed twice"),
            (["ray.colocate=[generator,learner]", "generator.num_actors=2"], "ray.colocate",
             r"same size .generator: 2, learner: 1., or leave ray.colocate empty .`ray.colocate=\[\]`.: each pool"),
            (["ray.colocate=[generator,learner]", "learner.gpus_per_rank=1"], "learner.gpus_per_rank",
             r"CPUs only.*`ray.colocate=\[\]`"),
            (["ray.colocate=[scorer,learner]", "scorer.node_labels={odpo-role: rollout}"], "ray.colocate",
             "same node_labels")):
        with pytest.raises(ConfigError, match=message) as e:
            load_config("configs/tiny.yaml", overrides)
        assert e.value.key == key


def test_colocated_pools_count_as_one_in_the_round_profile():
    """Hand-computed: generator busy 30 + (1.5 - 0.5) sync load = 31 s, scorer 2 s, learner 20 + 5 + 0.5 export
    = 25.5 s. Apart the floor is the busiest pool (31 s); colocated, generator and learner take turns: 56.5 s."""
    from orchestrator.report import profile

    m = {"timing/generate": 30.0, "timing/score": 2.0, "timing/train": 20.0, "timing/reference": 5.0, "timing/sync": 1.5}
    sizes = {"generator": 1, "scorer": 1, "learner": 1}
    apart = profile(m, 0.5, sizes, 60.0)
    together = profile(m, 0.5, sizes, 60.0, colocated=["generator", "learner"])
    assert (apart["profile/generator_busy_s"], apart["profile/learner_busy_s"]) == (31.0, 25.5)
    assert apart["profile/round_over_slowest"] == pytest.approx(60.0 / 31.0)
    assert together["profile/round_over_slowest"] == pytest.approx(60.0 / 56.5)
