#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded default model. Extra arguments go to the command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec rewardsvc score rewardsvc/samples/conversations.jsonl "$@"
