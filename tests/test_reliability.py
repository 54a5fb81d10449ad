"""Failure injection on a real local Ray cluster: actor processes killed (SIGKILL) or hung (SIGSTOP) by
pid mid-run, a learner rank killed, the driver killed and resumed, resources that cannot be placed, and
bad input. Each test asserts the outcome: every prompt accounted for, or the expected error, and no actor
of the run left alive."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, RULE_LOOP, wait_for

from actors.turns import HOLDER_BYTES, lock_path
from actors.user_code import UserFunctionError
from orchestrator import chaos
from orchestrator.config import load_config
from orchestrator.driver import run
from orchestrator.pools import PlacementError, PoolExhausted

pytestmark = pytest.mark.slow

BASE = [*RULE_LOOP, "data.prompts_per_round=32", "generator.chunk_size=4", "generator.max_new_tokens=16",
        "generator.cpus_per_actor=0.5", "scorer.cpus_per_actor=0.5", "metrics.wandb=false", "generator.backend=hf"]
"""The transformers generator, which builds in a second where a vLLM engine takes about ten: these faults are the
pools', the learner's and the driver's. The test that kills and hangs generators runs vLLM engines (the default)."""


def config(tmp_path, name: str, *overrides: str):
    return load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", f"run.name={name}", *BASE, *overrides])


def metrics_of(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def assert_every_prompt_once(cfg, run_dir: str) -> None:
    """Every prompt of every round a pair or a counted drop, once; versions consistent (orchestrator/chaos.py)."""
    assert chaos.accounting_problems(cfg, run_dir) == []


def assert_no_actor_alive(ray, prefixes=("generator", "scorer", "learner")) -> None:
    """Every name a run's actor can have (pool-rank, and pool-rank.k after k replacements) is free."""
    alive = []
    for name in (f"{p}-{r}{f'.{k}' if k else ''}" for p in prefixes for r in range(4) for k in range(4)):
        try:
            ray.get_actor(name)
            alive.append(name)
        except ValueError:
            pass
    assert not alive, f"actors of the run still alive: {alive}"


class Saboteur(threading.Thread):
    """Sends `sig` to the process of actor `name` when the run has committed `after_rounds` rounds."""

    def __init__(self, ray, run_dir: str, plan: list[tuple[int, str, int]]):
        super().__init__(daemon=True)
        self.ray, self.run_dir, self.plan, self.done, self.pids = ray, run_dir, plan, [], {}

    def run(self) -> None:
        deadline = time.time() + 240
        for name in {n for _, n, _ in self.plan}:  # pids while the actors are fresh (calls queue behind work)
            while time.time() < deadline:
                try:
                    self.pids[name] = self.ray.get(self.ray.get_actor(name).process_ids.remote())[0]
                    break
                except ValueError:
                    time.sleep(0.05)
        for after, name, sig in self.plan:
            while time.time() < deadline:
                path = os.path.join(self.run_dir, "metrics.jsonl")
                if os.path.exists(path) and len(open(path).readlines()) >= after:
                    os.kill(self.pids[name], sig)
                    self.done.append((after, name, sig))
                    break
                time.sleep(0.02)


def test_killed_and_hung_rollout_actors_are_replaced_and_nothing_is_lost(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = config(tmp_path, "faults", "run.rounds=4", "generator.num_actors=2", "generator.call_timeout_s=4",
                 "scorer.call_timeout_s=4", "generator.backend=auto")
    assert cfg.generator.backend == "auto"  # vLLM engines: killed and hung mid-generation
    run_dir = str(tmp_path / "faults")
    saboteur = Saboteur(ray_cluster, run_dir, [(1, "generator-0", signal.SIGSTOP),   # hangs in round 1
                                               (2, "scorer-0", signal.SIGKILL),      # dies in round 2
                                               (3, "generator-1", signal.SIGKILL)])  # dies in round 3
    saboteur.start()
    run(cfg)
    saboteur.join(timeout=5)
    assert len(saboteur.done) == 3
    m = metrics_of(run_dir)
    assert len(m) == 4
    assert sum(x["faults/generator_restarts"] for x in m) == 2
    assert sum(x["faults/scorer_restarts"] for x in m) == 1
    assert all(x["weight_version"] == x["round"] + 1 for x in m)  # replacements served the current weights
    assert_every_prompt_once(cfg, run_dir)
    assert_no_actor_alive(ray_cluster)


def test_past_the_restart_budget_the_run_stops_naming_the_pool(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = config(tmp_path, "budget", "run.rounds=2", "generator.max_restarts=0")
    saboteur = Saboteur(ray_cluster, str(tmp_path / "budget"), [(1, "generator-0", signal.SIGKILL)])
    saboteur.start()
    with pytest.raises(PoolExhausted, match=r"pool `generator`: actor generator-0 died .* restart budget \(0\)"):
        run(cfg)
    assert_no_actor_alive(ray_cluster)


@pytest.fixture(scope="module")
def straight(ray_cluster, tmp_path_factory) -> str:
    """The fault-free run that the runs with a dead learner or a killed driver must end like: BASE, 3 rounds."""
    out = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        return run(config(out, "straight", "run.rounds=3"))


def assert_same_outcome(run_dir, straight: str) -> None:
    """What the rounds produced (metrics but timings and fault counters, pairs files, final weights) equal."""
    assert chaos.differences(str(run_dir), straight) == []


def assert_recovered_like(straight: str, cfg, run_dir: str, ray, generator_restarts: int,
                          learner_retries: list[int]) -> None:
    """A run with faults ended as the fault-free one: these restarts and retries, every prompt once, the same
    outcome, no actor left."""
    m = metrics_of(run_dir)
    assert sum(x["faults/generator_restarts"] for x in m) == generator_restarts
    assert [x["faults/learner_retries"] for x in m] == learner_retries
    assert_every_prompt_once(cfg, run_dir)
    assert_same_outcome(run_dir, straight)
    assert_no_actor_alive(ray)


def test_learner_death_retries_the_round_from_the_last_checkpoint(ray_cluster, straight, tmp_path, monkeypatch):
    """The learner rank is SIGKILLed in round 1: the round is run again on a new learner group built from round
    0's checkpoint, and the run ends as the fault-free one does (same pairs, losses and rewards)."""
    monkeypatch.chdir(REPO)
    cfg = config(tmp_path, "learner", "run.rounds=3")
    run_dir = str(tmp_path / "learner")
    saboteur = Saboteur(ray_cluster, run_dir, [(1, "learner-0", signal.SIGKILL)])
    saboteur.start()
    run(cfg)
    m = metrics_of(run_dir)
    assert [x["faults/learner_retries"] for x in m] == [0, 1, 0]
    assert [x["weight_version"] for x in m] == [1, 2, 3]
    assert_every_prompt_once(cfg, run_dir)
    assert_same_outcome(run_dir, straight)
    assert_no_actor_alive(ray_cluster)


def test_colocated_pools_survive_faults_and_end_like_pools_apart(ray_cluster, straight, tmp_path, monkeypatch):
    """The generator and the learner colocated (ray.colocate), taking turns on one bundle of 1 CPU: each still
    computes on 1 thread, as apart, so the run must end exactly as the fault-free run with pools apart, even
    with the generator killed in round 1 (its replacement goes into the same bundle) and the learner rank killed
    in round 2 (the group is rebuilt in the same bundles), both possibly mid-turn."""
    from ray.util import placement_group_table

    monkeypatch.chdir(REPO)
    cfg = config(tmp_path, "colocated", "run.rounds=3", "ray.colocate=[generator,learner]", "learner.cpus_per_rank=0.5")
    run_dir = str(tmp_path / "colocated")
    before = set(placement_group_table())
    turn_files = set(glob.glob(lock_path("*")))
    saboteur = Saboteur(ray_cluster, run_dir, [(1, "generator-0", signal.SIGKILL), (2, "learner-0", signal.SIGKILL)])
    saboteur.start()
    run(cfg)
    saboteur.join(timeout=5)
    assert len(saboteur.done) == 2
    assert_recovered_like(straight, cfg, run_dir, ray_cluster, generator_restarts=1, learner_retries=[0, 0, 1])
    # every generator and learner (replacements and the rebuilt group included) went into one shared group
    made = {pg["name"] for key, pg in placement_group_table().items() if key not in before}
    assert made == {"odpo-colocated", "odpo-scorer-0"}
    wait_for(lambda: not [pg for pg in placement_group_table().values()
                          if pg["name"] == "odpo-colocated" and pg["state"] != "REMOVED"], 20,
             "the colocated placement group removed")
    assert set(glob.glob(lock_path("*"))) == turn_files  # its turns' lock files went with the group


def a_neighbour_waits_for(path: str) -> bool:
    """Another process is blocked on the turn's lock (/proc/locks lists a waiter as `->` on the file's inode)."""
    inode = f":{os.stat(path).st_ino} "
    with open("/proc/locks") as f:
        return any("->" in line and inode in line for line in f)


def stop_while_holding_its_turn(ray, name: str, run_dir: str, after_rounds: int, stopped: list) -> None:
    """SIGSTOP actor `name` at a moment it holds its colocated bundle's turn while a neighbour waits for it,
    once `after_rounds` rounds are committed: its name in a turn's lock file (written once it has the lock,
    blanked before it lets go) read before and after the signal; when it let go in between, SIGCONT and try
    again. (A learner stopped while no neighbour needs the cores is found by its own step timeout.) Appends the
    lock file and the round it was stopped in (the rounds committed, read once it is stopped)."""
    deadline = time.time() + 240
    pid = None
    while pid is None and time.time() < deadline:
        try:
            pid = ray.get(ray.get_actor(name).process_ids.remote())[0]
        except ValueError:
            time.sleep(0.05)
    mine = f"{name} {pid}"
    metrics = os.path.join(run_dir, "metrics.jsonl")

    def holder(path: str) -> str:  # the name in the file, lock or not (a stopped holder keeps its lock)
        with open(path, "rb") as f:
            return f.read(HOLDER_BYTES).decode(errors="replace").strip()

    while time.time() < deadline:
        if not os.path.exists(metrics) or len(open(metrics).readlines()) < after_rounds:
            time.sleep(0.02)
            continue
        for path in glob.glob(lock_path("*")):
            try:
                caught = holder(path) == mine and a_neighbour_waits_for(path)
            except FileNotFoundError:  # an earlier run's, removed with its placement group meanwhile
                continue
            if caught:
                os.kill(pid, signal.SIGSTOP)
                if holder(path) == mine:
                    stopped.append((path, len(open(metrics).readlines())))
                    return
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.001)


def test_colocated_a_learner_hung_holding_the_turn_is_blamed_not_its_neighbour(ray_cluster, straight, tmp_path,
                                                                               monkeypatch, capsys):
    """The learner rank stopped (SIGSTOP) while it holds the turn it shares with the generator, in round 1 (or 2,
    where no moment of round 1 had the generator waiting for it): the generator waits past its call timeout (6 s)
    for a turn that never comes. The driver reads who holds the
    bundle's turn and retries the round as for a hung learner (whose own step timeout, 60 s, is far off): the
    generator is not replaced (before, it was, and its replacement waited for the same turn), and the run ends
    exactly as the fault-free run with pools apart."""
    monkeypatch.chdir(REPO)
    cfg = config(tmp_path, "colocated-hang", "run.rounds=3", "ray.colocate=[generator,learner]",
                 "learner.cpus_per_rank=0.5", "generator.call_timeout_s=6", "learner.step_timeout_s=60")
    run_dir = str(tmp_path / "colocated-hang")
    stopped: list[tuple[str, int]] = []
    thread = threading.Thread(target=stop_while_holding_its_turn, args=(ray_cluster, "learner-0", run_dir, 1, stopped),
                              daemon=True)
    thread.start()
    run(cfg)
    thread.join(timeout=5)
    assert stopped, "the learner was never caught holding its turn"
    assert "learner-0 has held the cores it shares with generator-0 for 6s (generator.call_timeout_s; ray.colocate)" \
        in capsys.readouterr().err
    (_, hung_round), = stopped
    assert_recovered_like(straight, cfg, run_dir, ray_cluster, generator_restarts=0,
                          learner_retries=[int(r == hung_round) for r in range(3)])


def test_driver_killed_and_resumed_ends_like_an_uninterrupted_run(ray_cluster, straight, tmp_path, monkeypatch):
    """The driver (and with it its local Ray cluster) is SIGKILLed after round 1 and the same command is run
    again: the resumed run continues from round 2 and ends with the same pairs and metrics."""
    monkeypatch.chdir(REPO)
    overrides = [f"run.output_dir={tmp_path}", *BASE, "run.rounds=3", "run.overwrite=false"]

    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "configs/tiny.yaml", "run.name=resumed", *overrides,
           "ray.include_dashboard=false"]
    run_dir = tmp_path / "resumed"
    env = dict(os.environ, RAY_ADDRESS="")
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    wait_for(lambda: (run_dir / "state.json").exists(), 300, "the driver's first committed round")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started
    driver.wait()
    state = json.loads((run_dir / "state.json").read_text())
    assert 1 <= state["completed_rounds"] < 3
    second = subprocess.run([*cmd, "--resume", str(run_dir)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming {run_dir}" in second.stderr
    assert len(metrics_of(str(run_dir))) == 3
    assert_same_outcome(run_dir, straight)


def test_resume_keeps_the_last_good_checkpoint_when_the_loss_goes_non_finite(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    run(config(tmp_path, "nan", "run.rounds=1", "run.overwrite=false"))
    with pytest.raises(Exception, match="non-finite DPO loss"):  # resumed with an absurd learning rate
        run(config(tmp_path, "nan", "run.rounds=3", "learner.lr=1e30", "run.overwrite=false"))
    run_dir = tmp_path / "nan"
    assert json.loads((run_dir / "state.json").read_text())["completed_rounds"] == 1
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["round_0"]
    assert len(metrics_of(str(run_dir))) == 1
    assert_no_actor_alive(ray_cluster)


def test_resources_that_cannot_be_placed_fail_within_the_timeout(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = config(tmp_path, "gpu", "generator.backend=hf", "generator.gpus_per_actor=1", "ray.placement_timeout_s=3")
    # the error names the timeout it waited (no wall-clock assertion: this machine's speed is not the code's)
    with pytest.raises(PlacementError, match=r"pool `generator`: 1 x \{'CPU': 0.5, 'GPU': 1.0\} could not be placed "
                                             r"within 3s; the cluster has .*'CPU': 4\.0"):
        run(cfg)
    assert_no_actor_alive(ray_cluster)


def test_non_finite_reward_stops_the_run_naming_the_prompt(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = config(tmp_path, "nanreward", "scorer.function=test_actors:nan_reward")
    with pytest.raises(UserFunctionError) as e:  # Ray's RayTaskError from the scorer is a UserFunctionError too
        run(cfg)
    # what the CLI prints: the function's own one line (`cause`), not the actor's traceback
    assert re.fullmatch(r"scorer.function=test_actors:nan_reward failed on prompt '.+' \(response .*\): "
                        r"ValueError: returned nan \(not a finite number\); .*function_errors=score.*",
                        str(e.value.cause), flags=re.S)
    assert_no_actor_alive(ray_cluster)


def test_one_step_off_policy_rounds_lag_one_version_and_resume_on_the_pairs_they_drew(ray_cluster, straight, tmp_path,
                                                                                       monkeypatch, capsys):
    """run.staleness=1: round 0 streams as a synchronous round (equal to the fault-free synchronous run's, to
    the weight) while round 1's pairs are drawn from the same weights; every later round trains on pairs one
    version old. The driver dies in round 1's commit after everything but state.json is written (round 2's
    draw included): the resumed run removes that uncommitted draw, trains round 1 on the pairs round 0 drew
    and saved, draws round 2 again from the resumed weights, and ends exactly like the uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    from orchestrator.outputs import RunDir

    monkeypatch.chdir(REPO)
    full = run(config(tmp_path, "async", "run.rounds=3", "run.staleness=1"))
    m = metrics_of(full)
    assert [x["async/staleness_mean"] for x in m] == [0.0, 1.0, 1.0]
    assert [x["async/staleness_max"] for x in m] == [0, 1, 1]
    assert [x["weight_version"] for x in m] == [1, 2, 3]
    for r, version in enumerate([0, 0, 1]):
        pairs = [json.loads(line) for line in open(os.path.join(full, "pairs", f"round_{r}.jsonl"))]
        assert pairs and {p["weight_version"] for p in pairs} == {version}
    assert ["timing/draw_ahead" in x for x in m] == [True, True, False]  # the last round draws nothing
    assert open(os.path.join(full, "pairs", "round_0.jsonl")).read() == \
        open(os.path.join(straight, "pairs", "round_0.jsonl")).read()
    weights = [load_file(os.path.join(d, "checkpoints", "round_0", "model.safetensors")) for d in (full, straight)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert chaos.outcome(full)[1][1] != chaos.outcome(straight)[1][1]  # round 1 trained on older samples than the synchronous run's
    assert os.listdir(os.path.join(full, "ahead")) == []  # each drawn round's copy goes once the round commits
    assert_every_prompt_once(config(tmp_path, "async", "run.rounds=3", "run.staleness=1"), full)

    commit = RunDir.commit

    def dies_before_round_1_commits(self, cfg, completed_rounds):
        if completed_rounds == 2:
            raise KeyboardInterrupt("the driver dies in round 1's commit, before state.json")
        commit(self, cfg, completed_rounds)

    cfg = config(tmp_path, "async-resumed", "run.rounds=3", "run.staleness=1", "run.overwrite=false")
    monkeypatch.setattr(RunDir, "commit", dies_before_round_1_commits)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    resumed = str(tmp_path / "async-resumed")
    assert sorted(os.listdir(os.path.join(resumed, "ahead"))) == ["round_1.jsonl", "round_2.jsonl"]
    monkeypatch.setattr(RunDir, "commit", commit)
    capsys.readouterr()
    run(cfg)
    log = capsys.readouterr().err
    assert f"resuming {resumed} after round 0" in log
    assert "drawing round 3/3's pairs ahead, from weight version 1" in log  # round 2's uncommitted draw is redone
    assert_same_outcome(resumed, full)
    assert_no_actor_alive(ray_cluster)
