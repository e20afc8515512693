"""Shared pieces of the benchmarks: loading the embedded default or a tiny random scorer (`--tiny`), timing,
JSON-line output and the machine description."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_scorer(tiny: bool, **config):
    """The packaged default (embedded SmolLM2, early exit), or with `tiny` a random tiny Llama with random
    heads built on the fly (tests/tiny_models.py; seconds, no download)."""
    from rewardsvc.config import ScorerConfig
    from rewardsvc.model.scorer import Scorer

    if not tiny:
        return Scorer.load(config=ScorerConfig(**config))
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny_heads, save_tiny_llama

    root = Path(tempfile.mkdtemp(prefix="rewardsvc-bench-"))
    llama = save_tiny_llama(root / "llama", "chatml")
    heads = save_tiny_heads(root / "heads", llama)
    return Scorer.load(heads, config=ScorerConfig(**config))


def variant(scorer, **changes):
    return scorer.with_config(replace(scorer.config, **changes))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def machine() -> dict:
    import torch
    import transformers

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def emit(row: dict, out=None) -> None:
    line = json.dumps(row, sort_keys=False)
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(line + "\n")
