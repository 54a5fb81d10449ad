#!/usr/bin/env bash
# One machine.
#   launch/local.sh [CONFIG] [key=value ...]          the driver starts its own local Ray cluster (the default)
#   launch/local.sh submit [CONFIG] [key=value ...]   a one-machine cluster (`ray start --head`, token auth on,
#                                                     dashboard on 127.0.0.1:8265), the run submitted to it as a
#                                                     Ray job and followed; `launch/multinode.sh stop` ends it
# Either way the dashboard binds to 127.0.0.1 and Ray's token authentication stays on.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export WANDB_MODE="${WANDB_MODE:-offline}"
if [[ "${1:-}" == "submit" ]]; then
  shift
  export RAY_AUTH_MODE=token PATH="$PWD/.venv/bin:$PATH"
  # logical CPUs: at least 4, what configs/tiny.yaml's pools reserve (1 + 0.5 + 1), even on 2 cores
  ray status >/dev/null 2>&1 || launch/multinode.sh head --num-cpus "$(( $(nproc) < 4 ? 4 : $(nproc) ))"
  exec odpo submit "${1:-configs/tiny.yaml}" "${@:2}" --address http://127.0.0.1:"${DASHBOARD_PORT:-8265}" --follow
fi
exec .venv/bin/odpo run "${1:-configs/tiny.yaml}" "${@:2}"
