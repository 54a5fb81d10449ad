"""`odpo` command line: run, validate, the configuration reference, a LoRA checkpoint merged, and jobs on a Ray
cluster (submit, status, logs, stop, scale)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from actors.user_code import UserFunctionError
from orchestrator.config import InputError, field_docs, load_config, to_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="odpo", description="Online iterative DPO on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run rounds of online iterative DPO")
    p_run.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    p_run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.rounds=2 learner.lr=1e-6")
    p_run.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory from its last completed "
                       "round (the same as re-running with its run.output_dir and run.name)")
    p_val = sub.add_parser("validate", help="load and validate a config, print it resolved")
    p_val.add_argument("config")
    p_val.add_argument("overrides", nargs="*")
    sub.add_parser("config-docs", help="print the configuration reference (docs/configuration.md)")
    p_rm = sub.add_parser("train-rm", help="train a Bradley-Terry reward model (reward_training section) on "
                          "the learner group; the scorer loads the result")
    p_rm.add_argument("config")
    p_rm.add_argument("overrides", nargs="*")
    p_eval = sub.add_parser("eval", help="held-out metrics of a saved policy against the initial one (eval section)")
    p_eval.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/tiny/checkpoints/round_5")
    p_eval.add_argument("config", help="the run's config (its data, scorer, eval and initial policy)")
    p_eval.add_argument("overrides", nargs="*")

    address = dict(metavar="URL", help="the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_DASHBOARD_ADDRESS, "
                   "else $RAY_ADDRESS if it is an http URL, else http://127.0.0.1:8265); token auth: RAY_AUTH_MODE=token and the cluster's token")
    p_merge = sub.add_parser("merge", help="a LoRA run's checkpoint as a plain model: its adapters merged into the "
                             "initial policy, written where asked (loads in transformers and vLLM without peft)")
    p_merge.add_argument("checkpoint", help="runs/<name>/checkpoints/round_<k> of a run with learner.lora")
    p_merge.add_argument("dest", help="a new folder for the merged model")
    p_sub = sub.add_parser("submit", help="submit a run to a Ray cluster as a Ray job")
    p_sub.add_argument("config")
    p_sub.add_argument("overrides", nargs="*")
    p_sub.add_argument("--address", **address)
    p_sub.add_argument("--follow", action="store_true", help="stream the job's log until it ends")
    p_sub.add_argument("--working-dir", default=".", help="directory shipped to the cluster (default: .)")
    p_sub.add_argument("--runtime-env", metavar="YAML", help="extra runtime_env, e.g. launch/runtime_env.yaml")
    p_sub.add_argument("--output-dir", help="absolute run.output_dir on the cluster (default: the config's, "
                       "made absolute against the working directory)")
    p_sub.add_argument("--job-id", help="submission id (default: Ray's)")
    p_stat = sub.add_parser("status", help="this cluster's odpo jobs: round, stage progress, tokens/s")
    p_stat.add_argument("--address", **address)
    p_logs = sub.add_parser("logs", help="a job's log; --follow streams it until the job ends")
    p_logs.add_argument("job")
    p_logs.add_argument("--address", **address)
    p_logs.add_argument("--follow", action="store_true")
    p_stop = sub.add_parser("stop", help="stop a job (its completed rounds stay; submit again to resume)")
    p_stop.add_argument("job")
    p_stop.add_argument("--address", **address)
    p_scale = sub.add_parser("scale", help="resize a running run's generator/scorer pools before its next round")
    p_scale.add_argument("target", metavar="RUN_DIR_OR_JOB")
    p_scale.add_argument("--generators", type=int)
    p_scale.add_argument("--scorers", type=int)
    p_scale.add_argument("--address", **address)
    p_scale.add_argument("--via-cluster", action="store_true", help="for a job: always send the request through a "
                         "small job on the cluster, even when this machine sees the run directory")
    args = parser.parse_args(argv)

    if args.command == "config-docs":
        print(configuration_markdown(), end="")
        return 0
    try:
        if args.command in ("submit", "status", "logs", "stop", "scale"):
            return jobs_command(args)
        if args.command == "merge":
            from orchestrator.outputs import merge_checkpoint

            print(merge_checkpoint(args.checkpoint, args.dest))
            return 0
        overrides = list(args.overrides)
        if getattr(args, "resume", None):
            run_dir = os.path.abspath(args.resume)
            if not os.path.isfile(os.path.join(run_dir, "state.json")):
                raise InputError(f"--resume {args.resume}: no completed round to resume from (no state.json)")
            overrides += [f"run.output_dir={os.path.dirname(run_dir)}", f"run.name={os.path.basename(run_dir)}",
                          "run.resume=true", "run.overwrite=false"]
        cfg = load_config(args.config, overrides, command=args.command)
        if args.command == "validate":
            print(to_yaml(cfg), end="")
            return 0
        if args.command == "eval":
            import json

            from orchestrator.evaluation import evaluate_checkpoint

            print(json.dumps(evaluate_checkpoint(args.checkpoint, cfg), indent=1))
            return 0
        if args.command == "train-rm":
            from orchestrator.reward_training import train_reward_model

            print(train_reward_model(cfg))
            return 0
        from orchestrator.driver import run

        # `ray job stop` and schedulers send SIGTERM: unwind so the pools are shut down and wandb closes;
        # committed rounds are kept either way. (ray.init installs the same kind of handler, sys.exit.)
        signal.signal(signal.SIGTERM, _terminate)
        try:
            run(cfg)
        except SystemExit as e:
            if e.code in (signal.SIGTERM, 128 + signal.SIGTERM):
                print("odpo: stopped by SIGTERM; the pools are shut down, committed rounds stay (run the same "
                      "command again to resume)", file=sys.stderr, flush=True)
            raise
        return 0
    except InputError as e:  # what the user can fix, in one line; anything else (an actor's error, a bug) keeps
        # its traceback (Ray re-raises an actor's ValueError as a RayTaskError that is a ValueError too)
        print(f"odpo: {e}", file=sys.stderr)
        return 2
    except UserFunctionError as e:  # the user's own function failed, in the driver or in an actor (Ray's
        # RayTaskError is then a UserFunctionError too, its message a traceback; `cause` is the function's error)
        print(f"odpo: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        return 2


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def jobs_command(args) -> int:
    from orchestrator import jobs

    if args.command == "scale":
        sizes = {pool: n for pool, n in (("generator", args.generators), ("scorer", args.scorers)) if n is not None}
        if not sizes:
            raise InputError("give --generators N and/or --scorers N")
        if os.path.isdir(args.target):
            from orchestrator.control import request_scale

            pending = request_scale(os.path.abspath(args.target), sizes)
            print(f"odpo: {args.target}: the driver resizes to {pending} before its next round", file=sys.stderr)
            return 0
        return jobs.scale_job(jobs.client(args.address), args.target, sizes, args.via_cluster)
    if args.command == "submit":  # validates the config before it connects to anything
        return jobs.submit(args.config, args.overrides, args.address, args.working_dir, args.runtime_env,
                           args.output_dir, args.job_id, args.follow)
    c = jobs.client(args.address)
    if args.command == "status":
        print(jobs.status_table(c))
        return 0
    if args.command == "logs":
        if args.follow:
            return jobs.follow_logs(c, args.job)
        print(c.get_job_logs(args.job), end="")
        return 0
    return jobs.stop(c, args.job)


def configuration_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the schema (`orchestrator/config.py`, and `actors/settings.py` for the sections the",
        "actors receive) by `odpo config-docs` (a test keeps this file in step with it). Set fields in a YAML",
        "file (`section:` then `key: value`) or on the command line as `section.key=value`. Every value is",
        "validated before Ray starts; an error names the dotted key. Paths and installed engines are checked",
        "where the job runs (`odpo submit` leaves them to the cluster).",
        "",
    ]
    section = None
    for key, typ, default, doc in field_docs():
        head = key.split(".")[0]
        if head != section:
            section = head
            lines += [f"## `{section}`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        lines.append(f"| `{key}` | `{typ}` | `{default}` | {doc.replace('|', '/')} |")
    out: list[str] = []
    for line in lines:  # a blank line before each section header
        if line.startswith("## ") and out and out[-1] != "":
            out.append("")
        out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
