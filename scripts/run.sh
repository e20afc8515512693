#!/usr/bin/env bash
# Set up (idempotent; silent when nothing changed), show a small table of the sample conversations'
# scores and their top attributes (a smoke check of the embedded default model), then serve it over gRPC
# on 127.0.0.1:50051 (Prometheus metrics on :9090) until Ctrl-C / SIGTERM. Extra arguments go to
# `rewardsvc serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rewardsvc score rewardsvc/samples/conversations.jsonl --format table
exec rewardsvc serve --port "${REWARDSVC_PORT:-50051}" --metrics-port "${REWARDSVC_METRICS_PORT:-9090}" "$@"
