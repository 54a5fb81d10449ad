#!/usr/bin/env bash
# One machine: run odpo against a local Ray cluster that the driver starts itself (the default).
#   launch/local.sh configs/tiny.yaml run.rounds=2
# The dashboard binds to 127.0.0.1:8265 (Ray's default for a local cluster); Ray's token
# authentication stays on.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export WANDB_MODE="${WANDB_MODE:-offline}"
exec .venv/bin/odpo run "${1:-configs/tiny.yaml}" "${@:2}"
