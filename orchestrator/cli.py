"""`odpo` command line: run, validate, and the configuration reference."""

from __future__ import annotations

import argparse
import os
import sys

from orchestrator.config import ConfigError, field_docs, load_config, to_yaml


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
    args = parser.parse_args(argv)

    if args.command == "config-docs":
        print(configuration_markdown(), end="")
        return 0
    try:
        overrides = list(args.overrides)
        if getattr(args, "resume", None):
            run_dir = os.path.abspath(args.resume)
            if not os.path.isfile(os.path.join(run_dir, "state.json")):
                raise ValueError(f"--resume {args.resume}: no completed round to resume from (no state.json)")
            overrides += [f"run.output_dir={os.path.dirname(run_dir)}", f"run.name={os.path.basename(run_dir)}",
                          "run.resume=true", "run.overwrite=false"]
        cfg = load_config(args.config, overrides)
        if args.command == "validate":
            print(to_yaml(cfg), end="")
            return 0
        from orchestrator.driver import run

        run(cfg)
        return 0
    except ConfigError as e:
        print(f"odpo: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, ValueError) as e:
        print(f"odpo: {e}", file=sys.stderr)
        return 2


def configuration_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the schema in `orchestrator/config.py` by `odpo config-docs` (a test keeps this file in",
        "step with it). Set fields in a YAML file (`section:` then `key: value`) or on the command line as",
        "`section.key=value`. Every value is validated before Ray starts; an error names the dotted key.",
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
