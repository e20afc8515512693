"""Shared pieces of the benchmarks: loading the embedded default or a tiny random scorer (`--tiny`), timing,
JSON-line output and the machine description."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
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


def machine_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), the vCPU count and the GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = f"{cpu}, {os.cpu_count()} vCPU"
    try:
        import torch

        if torch.cuda.is_available():
            name += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return name


def git_commit() -> str:
    """HEAD of the repository the bench runs from (+dirty when tracked files differ from it)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp() -> dict:
    """What every results line carries (docs cite results files: machine, date, commit)."""
    return {"machine": machine_name(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit()}


def emit(row: dict, out=None) -> None:
    """Print one JSON line, and append it to `out` with machine, date and commit added where missing."""
    if out is not None:
        row = {**row, **{k: v for k, v in stamp().items() if k not in row}}
    line = json.dumps(row, sort_keys=False)
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(line + "\n")
