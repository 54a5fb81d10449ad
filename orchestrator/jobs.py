"""odpo runs as Ray jobs: `odpo submit`, `odpo status`, `odpo stop`, and `odpo scale JOB`.

Everything goes through Ray's Jobs SDK (`JobSubmissionClient`, HTTP to the dashboard, port 8265), so it
works from any machine that can reach the dashboard, with Ray's token authentication (RAY_AUTH_MODE=token
and the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).

A submitted run is `python -m orchestrator.cli run CONFIG overrides...` (`job_entrypoint`) in a runtime_env
that ships the working directory (this repository, without .venv, runs, caches) and the environment
variables the run needs. The config is validated here first, so a bad value fails before anything is
uploaded; what the machine must offer (vLLM, paths) is checked by the job on the cluster. Job
metadata marks the job as odpo's and records its run directory, which `odpo status` and `odpo scale` use.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
import uuid

import yaml

from orchestrator.config import InputError, load_config
from orchestrator.progress import parse_line

METADATA_KEY = "odpo_run_dir"
EXCLUDES = [".venv", "runs", ".cache", "wandb", ".git", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"]
# Passed from the submitting shell to the job when set there. Not paths (they name this machine's disk)
# nor secrets (a runtime_env is readable through the job API): set those in the nodes' environment or a
# --runtime-env file.
FORWARDED_ENV = ("WANDB_MODE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_CPU_KVCACHE_SPACE")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    ray_address = os.environ.get("RAY_ADDRESS", "")  # `ray job` users often set it to the dashboard's URL
    return JobSubmissionClient(address or os.environ.get("RAY_DASHBOARD_ADDRESS")
                               or (ray_address if ray_address.startswith("http") else None) or "http://127.0.0.1:8265")


def runtime_env(working_dir: str, extra_file: str | None = None) -> dict:
    """working_dir + env_vars, merged with a runtime_env YAML (launch/runtime_env.yaml) when given."""
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
           # `ray job stop` sends SIGTERM, then SIGKILL after this many seconds: room to shut pools down
           "RAY_JOB_STOP_WAIT_TIME_S": "30"}
    env.update({key: os.environ[key] for key in FORWARDED_ENV if key in os.environ})
    out: dict = {"working_dir": working_dir, "excludes": list(EXCLUDES), "env_vars": env}
    if extra_file:
        with open(extra_file) as f:
            extra = yaml.safe_load(f) or {}
        if not isinstance(extra, dict):
            raise InputError(f"{extra_file}: a runtime_env is a mapping (working_dir, env_vars, pip, ...)")
        out["env_vars"] = {**env, **{k: str(v) for k, v in (extra.pop("env_vars", None) or {}).items()}}
        out["excludes"] = list(dict.fromkeys(EXCLUDES + list(extra.pop("excludes", None) or [])))
        out.update(extra)
    return out


WRONG_PYTHON = ("odpo: the job runs python from the head node's PATH ($(command -v python || echo none)), which "
                "cannot import odpo's dependencies (omegaconf): the cluster's Ray runs from another environment. Start "
                "every node with that environment's bin first on PATH (launch/multinode.sh does; or source "
                ".venv/bin/activate before ray start), or install odpo into this interpreter's environment.")


def job_entrypoint(args: list[str]) -> str:
    """The shell command a Ray job runs for `odpo ARGS` on the head node. Ray starts it with /bin/sh and the
    PATH the head's `ray start` had, which need not lead to the interpreter Ray itself runs on (a cluster
    started as `.venv/bin/ray start` without the venv on PATH): the command says so, and what to do,
    instead of failing with a bare `No module named 'omegaconf'`."""
    check = f"python -c 'import omegaconf' 2>/dev/null || {{ echo \"{WRONG_PYTHON}\" >&2; exit 1; }}"
    return f"{check}; exec python -m orchestrator.cli " + " ".join(shlex.quote(a) for a in args)


def submit(config: str, overrides: list[str], address: str | None, working_dir: str = ".",
           runtime_env_file: str | None = None, output_dir: str | None = None, submission_id: str | None = None,
           follow: bool = False) -> int:
    """Validate, submit, print the job id; with `follow`, stream the log and return the job's exit status."""
    working_dir = os.path.abspath(working_dir)
    config_abs = os.path.abspath(config)
    if os.path.commonpath([config_abs, working_dir]) != working_dir:
        raise InputError(f"{config} is outside the working directory {working_dir} that is shipped to the "
                         "cluster; put it inside, or pass --working-dir")
    # values only: paths and installed engines are the cluster's, checked by the job where it runs
    cfg = load_config(config_abs, overrides, check_machine=False)
    # The job's working directory is a temporary copy: the run directory must be absolute (shared storage,
    # or the head node's disk when the driver runs there).
    run_parent = output_dir or (cfg.run.output_dir if os.path.isabs(cfg.run.output_dir)
                                else os.path.join(working_dir, cfg.run.output_dir))
    run_dir = os.path.join(run_parent, cfg.run.name)
    args = [os.path.relpath(config_abs, working_dir), *overrides, f"run.output_dir={run_parent}"]
    entrypoint = job_entrypoint(["run", *args])
    c = client(address)
    submission_id = submission_id or f"odpo-{cfg.run.name}-{uuid.uuid4().hex[:8]}"
    job_id = submit_when_ready(c, entrypoint=entrypoint, runtime_env=runtime_env(working_dir, runtime_env_file),
                               submission_id=submission_id,
                               metadata={METADATA_KEY: run_dir, "odpo_run_name": cfg.run.name,
                                         "odpo_config": os.path.relpath(config_abs, working_dir),
                                         "odpo_job_id": submission_id})
    print(job_id)
    print(f"odpo: submitted {job_id}; run directory {run_dir} (on the cluster's driver node)\n"
          f"      follow: odpo logs {job_id}   progress: odpo status   stop: odpo stop {job_id}", file=sys.stderr)
    if not follow:
        return 0
    return follow_logs(c, job_id)


def submit_when_ready(c, timeout_s: float = 120.0, **kwargs) -> str:
    """submit_job, waiting out a cluster that has just started: its job agent answers a little after the
    head is up ("No available agent to submit job")."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return c.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            print("odpo: the cluster's job agent is not up yet; retrying", file=sys.stderr)
            time.sleep(2)


def follow_logs(c, job_id: str) -> int:
    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    status = wait_terminal(c, job_id)
    print(f"odpo: job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def wait_terminal(c, job_id: str, timeout_s: float = 3600.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(c.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def odpo_jobs(c) -> list:
    return [j for j in c.list_jobs() if (j.metadata or {}).get(METADATA_KEY)]


def job_progress(c, job) -> dict | None:
    """The last progress line of a running job's log (round, stage, counts, tokens/s)."""
    if str(job.status.value) in TERMINAL:
        return None
    try:
        return parse_line(c.get_job_logs(job.submission_id))
    except Exception:  # a job whose driver has not started yet has no log
        return None


def status_table(c) -> str:
    rows = [("JOB", "STATUS", "RUN", "ROUND", "STAGE", "GENERATED", "SCORED", "TRAINED", "GEN TOK/S",
             "SCORE TOK/S", "TRAIN TOK/S", "RUN DIR")]
    for job in sorted(odpo_jobs(c), key=lambda j: j.start_time or 0):
        p = job_progress(c, job)
        md = job.metadata
        progress = ((f"{p['round']}/{p['rounds']}", p["stage"], f"{p['generated']}/{p['prompts']}",
                     f"{p['scored']}/{p['prompts']}", str(p["trained"]), str(p["gen_tps"]), str(p["score_tps"]),
                     str(p["train_tps"])) if p else ("-",) * 8)
        rows.append((job.submission_id, str(job.status.value), md.get("odpo_run_name", "-"), *progress,
                     md[METADATA_KEY]))
    if len(rows) == 1:
        return "no odpo jobs on this cluster"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def stop(c, job_id: str, timeout_s: float = 60.0) -> int:
    job = c.get_job_info(job_id)
    if not (job.metadata or {}).get(METADATA_KEY):
        raise InputError(f"{job_id} is not an odpo job")
    c.stop_job(job_id)
    status = wait_terminal(c, job_id, timeout_s)
    print(f"odpo: job {job_id} {status}; completed rounds stay in {job.metadata[METADATA_KEY]} "
          f"(resume: submit the same config and run.name again)", file=sys.stderr)
    return 0 if status in TERMINAL else 1


def sees_run_dir(run_dir: str, job_id: str) -> bool:
    """This machine sees the job's own run directory (same machine or shared storage), not a namesake."""
    try:
        with open(os.path.join(run_dir, "job.json")) as f:
            return json.load(f).get("job_id") == job_id
    except (OSError, ValueError):
        return False


def scale_job(c, job_id: str, sizes: dict[str, int], via_cluster: bool = False) -> int:
    """Resize a running job's rollout pools: write the request into its run directory, directly when this
    machine sees it, else through a small job on the cluster (it runs on the head node, like the driver)."""
    from orchestrator.control import request_scale

    job = c.get_job_info(job_id)
    run_dir = (job.metadata or {}).get(METADATA_KEY)
    if not run_dir:
        raise InputError(f"{job_id} is not an odpo job")
    if str(job.status.value) in TERMINAL:
        raise InputError(f"job {job_id} is {job.status.value}; resize a finished run on resume instead "
                         "(generator.num_actors=N)")
    if not via_cluster and sees_run_dir(run_dir, job_id):
        request_scale(run_dir, sizes)
    else:
        flags = " ".join(f"--{pool}s {n}" for pool, n in sizes.items())
        # ship this checkout's code; an installed odpo (no pyproject.toml next to it) is on the cluster already
        ship = {"working_dir": REPO, "excludes": list(EXCLUDES)} if os.path.isfile(
            os.path.join(REPO, "pyproject.toml")) else None
        helper = submit_when_ready(c, entrypoint=job_entrypoint(["scale", run_dir, *flags.split()]),
                                   runtime_env=ship, metadata={"odpo_helper_for": job_id})
        if wait_terminal(c, helper, 300) != "SUCCEEDED":
            raise RuntimeError(f"the scale request job {helper} failed:\n{c.get_job_logs(helper)[-2000:]}")
    print(f"odpo: asked job {job_id} to resize {sizes} before its next round", file=sys.stderr)
    return 0
