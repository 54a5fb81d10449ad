"""A real multi-node Ray cluster on this machine, started the way launch/multinode.sh starts one.

The head (`ray start --head`, token authentication on, labelled odpo-role=train, offering a `trainer`
resource) and a second raylet (`ray start --address`, labelled odpo-role=rollout, offering `rollout`
resources: a stand-in for a rollout node) run in their own process groups, so a test can kill one node
without touching the session's other Ray cluster. Runs are submitted the way users submit them: the
`odpo` CLI (`odpo submit`, `odpo status`, `odpo scale`) and the plain `ray job submit -- ... run` form.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, RULE_LOOP, wait_for

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(token_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), PATH=f"{BIN}:{env.get('PATH', '')}",
               # notice a dead node within seconds, not Ray's default ~30 s
               RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
               RAY_health_check_timeout_ms="1000", RAY_kill_worker_timeout_milliseconds="1000",  # as launch/ sets it
               TORCH_EXTENSIONS_DIR=os.environ.get(
                   "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    env.pop("RAY_ADDRESS", None)
    return env


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.token = root / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.env = cluster_env(self.token)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.metrics_ports: dict[str, int] = {}
        self.nodes: dict[str, subprocess.Popen] = {}
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep for them
        self.ray_tmp = tempfile.mkdtemp(prefix="odpo-ray-", dir="/tmp")

    def start_node(self, name: str, head: bool, cpus: int, resources: dict, labels: str) -> str:
        """`ray start` in its own process group; returns the new node's id."""
        port = self.metrics_ports[name] = free_port()
        # every port its own: another Ray cluster on this machine (the session's, a user's) must not collide
        cmd = [str(BIN / "ray"), "start", f"--num-cpus={cpus}", f"--resources={json.dumps(resources)}",
               f"--labels={labels}", f"--metrics-export-port={port}", "--disable-usage-stats", "--block",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
               f"--object-manager-port={free_port()}"]
        if head:
            cmd += ["--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                    "--dashboard-host=127.0.0.1", f"--temp-dir={self.ray_tmp}",
                    f"--ray-client-server-port={free_port()}"]
        else:
            cmd += [f"--address=127.0.0.1:{self.gcs_port}"]
        before = set(self.alive_nodes())
        log = open(self.root / f"{name}.log", "w")
        self.nodes[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

        def joined() -> set[str]:
            assert self.nodes[name].poll() is None, (self.root / f"{name}.log").read_text()[-3000:]
            return set(self.alive_nodes()) - before

        return wait_for(joined, 120, f"node {name} to join the cluster", interval_s=0.5).pop()

    def alive_nodes(self) -> list[str]:
        """Node ids the head reports alive (through the authenticated dashboard API)."""
        if "head" not in self.nodes:
            return []
        try:
            data = self.api("/api/v0/nodes")
        except OSError:
            return []
        return [n["node_id"] for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def api(self, path: str) -> dict:
        """GET on the dashboard with the cluster's token (Ray's token authentication is on)."""
        req = urllib.request.Request(self.dashboard + path, headers={"authorization": f"Bearer {self.token.read_text()}"})
        return json.loads(urllib.request.urlopen(req, timeout=10).read())

    def wait_for_job_agent(self) -> None:
        """The head's job agent answers a little after the node is up; the plain `ray job submit` does not
        wait for it (odpo submit does)."""
        def answers() -> bool:
            probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--", "true"],
                                   env=self.env, capture_output=True, text=True, timeout=120)
            return probe.returncode == 0

        wait_for(answers, 120, "the head's job agent to take a job", interval_s=1)

    def kill(self, name: str) -> None:
        """The node's raylet and everything it started, at once (SIGKILL to its process group)."""
        try:
            os.killpg(self.nodes[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.nodes[name].wait()

    def odpo(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "odpo"), *args, "--address", self.dashboard], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def shutdown(self) -> None:
        for name in reversed(list(self.nodes)):
            self.kill(name)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.head_id = c.start_node("head", True, 4, {"trainer": 1}, "odpo-role=train")
        c.rollout_id = c.start_node("rollout", False, 2, {"rollout": 2}, "odpo-role=rollout")
        c.wait_for_job_agent()
        yield c
    finally:
        c.shutdown()


def job_status(c: Cluster, job_id: str) -> str:
    """Through the dashboard's job API, as `ray job status` reads it."""
    return c.api(f"/api/jobs/{job_id}")["status"]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """odpo's samples on a node's Prometheus endpoint: (name, tags that are not Ray's own) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for m in re.finditer(r"^(ray_odpo_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        tags = frozenset(t for t in m.group(2).split(",") if t.split("=")[0] in ("run", "stage", "pool"))
        samples[(m.group(1), tags)] = float(m.group(3))
    return samples


ROUNDS = 16  # the submitted run: a resize sent once round 0 has begun (through a helper job, 12-16 s) lands well before
# the end (rounds of this config take under 2 s here: 8 were once too few)
TINY = [*RULE_LOOP, "generator.backend=hf", "data.prompts_per_round=24", "generator.max_new_tokens=24", "generator.n=4",
        "generator.temperatures=[1.0]", "generator.chunk_size=4", "learner.global_batch_size=8",
        "metrics.progress_interval_s=1", "metrics.wandb=false", "ray.placement_timeout_s=60",
        "generator.cpus_per_actor=0.5", "learner.resources={trainer: 1}", "scorer.node_labels={odpo-role: train}"]


@pytest.fixture(scope="module")
def submitted(cluster, tmp_path_factory):
    """One run submitted with `odpo submit`, generators on the rollout node by their resources; while it
    runs: `odpo status` and the head's Prometheus endpoint are polled, and once round 0 has begun (its progress
    line is in the job's log: the driver took any pending request before that line) `odpo scale JOB
    --generators 2` is sent, so the resize can land no earlier than round 1."""
    runs = tmp_path_factory.mktemp("runs")
    name = "submitted"
    # a user's task folder: its reward module, beside the config, is found by the scorer on the cluster
    sub = cluster.odpo("submit", "tests/user_task/task.yaml", *TINY, f"run.rounds={ROUNDS}", f"run.name={name}",
                       "generator.num_actors=1", "generator.resources={rollout: 1}", "--output-dir", str(runs))
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1]
    run_dir = runs / name
    record = {"job_id": job_id, "run_dir": run_dir, "status_outputs": [], "scrapes": [], "scaled_from": None}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        done = read_metrics(run_dir)
        if record["scaled_from"] is None and (done or re.search(
                rf"round \d+/{ROUNDS} \[", cluster.api(f"/api/jobs/{job_id}/logs").get("logs", ""))):
            start = time.monotonic()
            scale = cluster.odpo("scale", job_id, "--generators", "2", "--via-cluster")  # as from another machine
            record["scale_s"] = time.monotonic() - start
            assert scale.returncode == 0, scale.stderr
            record["scaled_from"] = max(len(done), 1)  # round 0 has begun: the earliest round the resize can reach
        st = cluster.odpo("status")
        record["status_outputs"].append(st.stdout)
        try:
            record["scrapes"].append(scrape(cluster.metrics_ports["head"]))
        except OSError:
            pass
        status = job_status(cluster, job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    else:
        status = "TIMEOUT"
    record["status"] = status
    record["logs"] = cluster.odpo("logs", job_id).stdout
    return record


def test_submitted_run_completes_with_generators_on_the_rollout_node(cluster, submitted):
    assert submitted["status"] == "SUCCEEDED", submitted["logs"][-4000:]
    metrics = read_metrics(submitted["run_dir"])
    assert [m["round"] for m in metrics] == list(range(ROUNDS))
    placement = json.loads((submitted["run_dir"] / "placement.json").read_text())
    assert set(placement["generator"].values()) == {cluster.rollout_id}, placement  # placed by `rollout`
    assert set(placement["learner"].values()) == {cluster.head_id}  # by `trainer`
    assert set(placement["scorer"].values()) == {cluster.head_id}  # by the odpo-role=train label
    assert (submitted["run_dir"] / "plots" / "rounds.png").stat().st_size > 10_000
    config = (submitted["run_dir"] / "config.yaml").read_text()
    assert "function: odpo_user_reward:lowercase_share" in config  # the user's own function scored every round


def test_status_reported_the_running_job(submitted):
    job = submitted["job_id"]
    rows = [line for out in submitted["status_outputs"] for line in out.splitlines() if line.startswith(job)]
    running = [r for r in rows if " RUNNING " in r and re.search(rf" \d+/{ROUNDS} +(stream|epochs|sync|done) ", r)]
    assert running, "\n".join(submitted["status_outputs"][-5:])
    # the progress columns move: some row shows prompts generated and tokens per second
    assert any(re.search(rf" \d+/{ROUNDS} +\w+ +([1-9]\d*)/24 .* [1-9]\d* ", r) for r in running), running


def test_resize_between_rounds_takes_effect_with_current_weights(submitted):
    metrics = read_metrics(submitted["run_dir"])
    k = submitted["scaled_from"]
    assert k is not None and k < ROUNDS
    sizes = [m["pool/generators"] for m in metrics]
    assert sizes[0] == 1 and sizes[-1] == 2, (sizes, f"the scale command took {submitted['scale_s']:.1f}s")
    first_big = sizes.index(2)
    assert first_big >= k  # applied between rounds, never inside one
    assert all(m["gen/actors_used"] == m["pool/generators"] for m in metrics), metrics
    for m in metrics:  # every rollout of round r came from weights version r, new actor included
        pairs = [json.loads(line) for line in
                 (submitted["run_dir"] / "pairs" / f"round_{m['round']}.jsonl").read_text().splitlines()]
        assert pairs and {p["weight_version"] for p in pairs} == {m["round"]}
    assert "generator pool resized 1 -> 2" in submitted["logs"]


def test_custom_metrics_on_the_prometheus_endpoint(submitted):
    seen: dict[tuple[str, frozenset], list[float]] = {}
    for scrape_ in submitted["scrapes"]:
        for key, value in scrape_.items():
            seen.setdefault(key, []).append(value)
    run = 'run="submitted"'

    def values(name: str, tag: str = "") -> list[float]:
        return seen.get((f"ray_odpo_{name}", frozenset(t for t in (run, tag) if t)), [])

    assert values("round") and set(values("round")) <= set(range(ROUNDS))
    assert values("weight_version") and max(values("weight_version")) <= ROUNDS
    for stage in ("generated", "scored", "trained"):
        counts = values("prompts_total", f'stage="{stage}"')
        assert counts and max(counts) > 0 and counts == sorted(counts), (stage, counts)  # a counter only grows
    assert max(values("prompts_total", 'stage="generated"')) <= ROUNDS * 24
    assert max(values("tokens_per_second", 'pool="generator"')) > 0
    assert values("queue_depth", 'pool="generator"') and min(values("queue_depth", 'pool="generator"')) >= 0
    assert set(values("pool_actors", 'pool="generator"')) <= {1, 2}
    assert all(0 <= v <= 1 for v in values("reward_mean")) and values("reward_mean")  # lowercase ratio
    assert all(0 < v < 10 for v in values("loss")) and values("loss")


def test_losing_a_rollout_node_mid_run_completes_on_the_rest(cluster, tmp_path):
    """Plain `ray job submit -- python -m orchestrator.cli run ...`; three generators fill the rollout
    capacity of two nodes (2 + 1). The first node's processes are SIGKILLed mid-run: its generators'
    replacements find no room, the pool goes on with the one left, and every round completes. Giving an
    actor up is not a restart: a budget of 1 is not spent by losing 2."""
    spare_id = cluster.start_node("spare", False, 1, {"rollout": 1}, "odpo-role=rollout")
    run_dir = tmp_path / "lost"
    args = ["configs/tiny.yaml", *TINY, "run.rounds=4", "run.name=lost", f"run.output_dir={tmp_path}",
            "generator.num_actors=3", "generator.resources={rollout: 1}", "ray.replace_placement_timeout_s=5",
            "generator.max_restarts=1"]
    sub = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--no-wait",
                          "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", ".cache", ".git"]}),
                          "--", "python", "-m", "orchestrator.cli", "run", *args],
                         cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    job_id = re.search(r"Job '([^']+)' submitted", sub.stdout + sub.stderr).group(1)
    deadline = time.monotonic() + 600
    killed = False
    while time.monotonic() < deadline:
        if not killed and read_metrics(run_dir):  # round 0 done: round 1 is streaming
            placement = json.loads((run_dir / "placement.json").read_text())["generator"]
            assert sorted(placement.values()) == sorted([cluster.rollout_id] * 2 + [spare_id])
            cluster.kill("rollout")
            killed = True
        status = job_status(cluster, job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
    logs = cluster.odpo("logs", job_id).stdout
    assert killed and status == "SUCCEEDED", logs[-4000:]
    metrics = read_metrics(run_dir)
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    assert metrics[0]["pool/generators"] == 3 and metrics[-1]["pool/generators"] == 1, metrics
    assert metrics[-1]["pool/generators_dropped"] == 2
    assert set(json.loads((run_dir / "placement.json").read_text())["generator"].values()) == {spare_id}
    for m in metrics:  # nothing lost: every prompt ends as a pair or a counted drop
        assert m["pairs/count"] + sum(v for k, v in m.items() if k.startswith("drop/")) == m["prompts/count"] == 24


def test_stop_keeps_committed_rounds_and_submitting_again_resumes(cluster, tmp_path):
    # 8 rounds of about a second or two: the stop, sent once round 0 is committed, must land before the last one
    # (with 3 rounds, a busy machine's `odpo stop` once arrived after the job had finished)
    rounds = 8
    args = ["configs/tiny.yaml", *TINY, f"run.rounds={rounds}", "run.name=stopped", "run.overwrite=false",
            "--output-dir", str(tmp_path)]
    sub = cluster.odpo("submit", *args)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1]
    run_dir = tmp_path / "stopped"
    wait_for(lambda: read_metrics(run_dir), 300, "the job's first committed round", interval_s=0.5)
    stop = cluster.odpo("stop", job_id)
    assert stop.returncode == 0, stop.stderr
    assert job_status(cluster, job_id) == "STOPPED"
    assert "odpo: stopped by SIGTERM; the pools are shut down" in cluster.odpo("logs", job_id).stdout  # it unwound
    done = json.loads((run_dir / "state.json").read_text())["completed_rounds"]
    assert 1 <= done < rounds
    alive = cluster.api("/api/v0/actors?limit=1000")["data"]["result"]["result"]
    leftovers = [a["name"] for a in alive if a["state"] == "ALIVE" and re.match(r"(generator|scorer|learner)-", a["name"] or "")]
    assert not leftovers  # the stopped driver took its pools with it

    again = cluster.odpo("submit", *args, "--follow", timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert f"resuming {run_dir} after round {done - 1}" in again.stdout
    assert [m["round"] for m in read_metrics(run_dir)] == list(range(rounds))  # nothing redone twice, nothing missing
