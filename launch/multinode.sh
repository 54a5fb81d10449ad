#!/usr/bin/env bash
# A multi-node Ray cluster for odpo, Ray's token authentication on. Run on each machine (docs/cluster.md).
#
#   launch/multinode.sh head   [--num-gpus 8] [--resources '{"trainer": 8}'] [--labels odpo-role=train]
#   launch/multinode.sh worker HEAD_IP [--num-gpus 8] [--resources '{"rollout": 8}'] [--labels odpo-role=rollout]
#   launch/multinode.sh stop
#
# Extra arguments go to `ray start` unchanged. Each node declares what it offers: `--resources` (custom
# resources that pools ask for in `generator.resources`, `scorer.resources`, `learner.resources`) and
# `--labels` (matched by `*.node_labels`). Every node must hold the same token: the head creates one in
# ~/.ray/auth_token (or $RAY_AUTH_TOKEN_PATH) if none exists; copy it to each worker (or export
# RAY_AUTH_TOKEN) before starting it, and to every machine that runs `odpo submit/status/stop`.
# Environment: RAY_PORT (6379), DASHBOARD_PORT (8265), DASHBOARD_HOST (127.0.0.1: reach it over an SSH
# tunnel; 0.0.0.0 exposes the job API to the network, protected by the token), METRICS_PORT (8080).
set -euo pipefail
cd "$(dirname "$0")/.."
RAY="${RAY:-$(command -v ray || echo .venv/bin/ray)}"
# Ray runs a job's entrypoint (`python -m orchestrator.cli ...`) with this shell's PATH: put the interpreter
# Ray itself runs on first, so `python` there is the one with odpo's dependencies.
export PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"
export RAY_AUTH_MODE=token
# a hung actor's cores freed 1 s after it is killed, not Ray's 5 (orchestrator/cluster.py: KILL_WORKER_TIMEOUT_MS)
export RAY_kill_worker_timeout_milliseconds="${RAY_kill_worker_timeout_milliseconds:-1000}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
RAY_PORT="${RAY_PORT:-6379}"
role="${1:-}"; shift || true
case "$role" in
  head)
    "$RAY" get-auth-token --generate >/dev/null  # keeps an existing token
    exec "$RAY" start --head --port="$RAY_PORT" --dashboard-host="${DASHBOARD_HOST:-127.0.0.1}" \
      --dashboard-port="${DASHBOARD_PORT:-8265}" --metrics-export-port="${METRICS_PORT:-8080}" \
      --disable-usage-stats "$@" ;;
  worker)
    head_ip="${1:?usage: launch/multinode.sh worker HEAD_IP [ray start args]}"; shift
    exec "$RAY" start --address="$head_ip:$RAY_PORT" --metrics-export-port="${METRICS_PORT:-8080}" \
      --disable-usage-stats "$@" ;;
  stop)
    exec "$RAY" stop ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
