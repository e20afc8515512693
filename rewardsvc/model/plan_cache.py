"""The on-disk cache of `auto` plan decisions, so that only the first start on a machine pays the measurement.

Keyed by everything the measured speed and accuracy depend on: the CPU (model name and flags), the torch
version, the thread count, the backbone (its id, depth and a content fingerprint of its weights), the heads
(their SHA-256), the batching limits, what the flags left to choose, and the measurement's own version.
One JSON file per key under `<cache root>/plans/` (the cache root of model/backbone_loading.py); written
atomically, so concurrent starts at worst measure twice. A file that does not parse is measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from .scoring_plan import CandidateMeasurement, PlanDecision, ScoringPlan

log = logging.getLogger(__name__)

MEASUREMENT_VERSION = 1
"""Bump when the measurement set, the candidates or the criteria change: old decisions no longer apply."""


def cpu_description() -> str:
    """`model name` and the flags of /proc/cpuinfo (bf16 speed depends on avx512_bf16 / amx_bf16), or what
    platform knows elsewhere."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == (platform.processor() or platform.machine()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{name} | {flags}"


def weights_fingerprint(model: torch.nn.Module, samples: int = 64) -> str:
    """A cheap content fingerprint of a model's weights: every parameter's name, shape and dtype, and `samples`
    evenly strided values of it (milliseconds for a 135M model, where hashing every byte takes seconds)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        picked = flat[::step][:samples].to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key_fields(scorer: Any, choices: dict[str, Any]) -> dict[str, Any]:
    """What the decision depends on (`choices`: what the flags left open, from plan_measurement)."""
    from .calibration import heads_sha256

    c = scorer.config
    return {
        "measurement_version": MEASUREMENT_VERSION,
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "backbone": scorer.backbone_description(),
        "backbone_weights": weights_fingerprint(scorer.backbone.model),
        "heads_sha256": heads_sha256(scorer.heads),
        "token_budget": c.token_budget,
        "max_batch_size": c.max_batch_size,
        "share_prompts": c.share_prompts,
        "choices": choices,
    }


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(directory: Path, fields: dict[str, Any]) -> Path:
    return Path(directory) / f"{cache_key(fields)}.json"


def read_cached(directory: Path, fields: dict[str, Any]) -> PlanDecision | None:
    """The decision stored for these fields, or None (absent, unreadable, or stored for other fields)."""
    path = cache_path(directory, fields)
    try:
        data = json.loads(path.read_text())
        if data.get("key_fields") != json.loads(json.dumps(fields)):
            return None
        plan = ScoringPlan(data["plan"]["batch_plan"], data["plan"]["precision"])
        measurements = tuple(CandidateMeasurement.from_dict(m) for m in data.get("measurements", []))
        return PlanDecision(plan, "cache", f"{data['reason']} (measured {data.get('created', '?')}, {path})", measurements)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring the unreadable plan cache file %s (%s); measuring again", path, exc)
        return None


def write_cached(directory: Path, fields: dict[str, Any], decision: PlanDecision, created: str) -> Path | None:
    """Store a measured decision; a cache that cannot be written is a warning (the next start measures again)."""
    path = cache_path(directory, fields)
    body = {"key_fields": fields, "plan": {"batch_plan": decision.plan.batch_plan, "precision": decision.plan.precision},
            "reason": decision.reason, "measurements": [m.as_dict() for m in decision.measurements],
            "measure_seconds": decision.measure_seconds, "created": created}  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(body, handle, indent=1)
        os.replace(tmp, path)
        return path
    except OSError as exc:
        log.warning("cannot write the plan cache %s: %s", path, exc)
        return None
