"""Calibration statistics stored with a model: `calibration.json` in the checkpoint directory, beside
rewardsvc.json (heads format) or config.json (reference format), loaded with the model by Scorer.load.

The file is bound to the model that was measured: the SHA-256 of the heads' tensors and the backbone's
description. A checkpoint whose heads were retrained, or a server started on another backbone, finds a
calibration that does not match; it is then not used (and a request for normalization says why), since the
statistics of other heads would normalize silently wrong.

Format (version 1):
  {"format": "rewardsvc.calibration", "format_version": 1, "calibration_id": "cal-<12 hex>",
   "model": {"model_id", "heads_sha256", "backbone", "dtype"},
   "reference": {"path", "sha256", "rows"}, "count": N, "std_ddof": 0,
   "score": {"mean", "std"}, "rewards": {attribute: {"mean", "std"}}, "created", "rewardsvc_version"}
The calibration id hashes the model fingerprint, the reference set's hash and the statistics: two replicas
with the same id normalize identically.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, InvalidInputError
from ..normalization import Calibration, Stats
from ..types import ScoreResult

CALIBRATION_FILE = "calibration.json"
FORMAT = "rewardsvc.calibration"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)


def heads_sha256(heads: torch.nn.Module) -> str:
    """SHA-256 over the heads' tensors (name, shape, float32 bytes), in name order: the same for a heads
    checkpoint and a reference checkpoint holding the same numbers."""
    digest = hashlib.sha256()
    for name, tensor in sorted(heads.state_dict().items()):
        t = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def population_stats(values: Sequence[float], what: str) -> Stats:
    """Mean and population standard deviation (ddof=0), in exactly rounded sums."""
    n = len(values)
    if n < 2:
        raise InvalidInputError(f"calibration needs at least 2 conversations, got {n}", field="input")
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)
    if not std > 0:
        raise InvalidInputError(
            f"calibration: {what} is the same ({mean}) for every conversation of the reference set; a z-score "
            "needs spread (use a reference set with varied responses)",
            field="input",
        )
    return Stats(mean=mean, std=std)


@dataclass(frozen=True)
class ModelFingerprint:
    """What a calibration is bound to."""

    model_id: str
    heads_sha256: str
    backbone: str
    dtype: str

    def mismatch(self, other: "ModelFingerprint") -> str | None:
        """Why `other` (the loaded model) is not the model this was measured on, or None. dtype is recorded but
        not compared: bfloat16 and float32 scores differ by far less than a standard deviation."""
        for name in ("heads_sha256", "backbone"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"measured with {name}={mine}, the loaded model has {name}={theirs}"
        return None


def fingerprint_of(scorer: Any) -> ModelFingerprint:
    return ModelFingerprint(
        model_id=scorer.model_id,
        heads_sha256=heads_sha256(scorer.heads),
        backbone=scorer.backbone_description(),
        dtype=str(scorer.backbone.dtype).replace("torch.", ""),
    )


def measure(
    results: Sequence[ScoreResult], attributes: Sequence[str], model: ModelFingerprint, reference: dict[str, Any],
    created: str, version: str,
) -> tuple[Calibration, dict[str, Any]]:
    """Statistics of raw, unsteered results (scored with weights=None) -> (Calibration, the JSON document)."""
    score = population_stats([r.score for r in results], "the score")
    rewards = {a: population_stats([r.rewards[a] for r in results], f"reward {a!r}") for a in attributes}
    body = {
        "model": model.__dict__,
        "reference": reference,
        "count": len(results),
        "std_ddof": 0,
        "score": score.__dict__,
        "rewards": {a: s.__dict__ for a, s in rewards.items()},
    }
    calibration_id = "cal-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "calibration_id": calibration_id, **body,
                "created": created, "rewardsvc_version": version}  # fmt: skip
    return _calibration(document), document


def _calibration(document: dict[str, Any]) -> Calibration:
    return Calibration(
        calibration_id=document["calibration_id"],
        score=Stats(**document["score"]),
        rewards={a: Stats(**s) for a, s in document["rewards"].items()},
        count=int(document["count"]),
        info={k: document[k] for k in ("model", "reference", "std_ddof", "created", "rewardsvc_version") if k in document},
    )


def save_calibration(directory: str | Path, document: dict[str, Any]) -> Path:
    path = Path(directory) / CALIBRATION_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)  # a reader never sees half a file
    return path


def read_calibration(path: str | Path) -> tuple[Calibration, ModelFingerprint]:
    """Parse and check one calibration file (CheckpointError naming the file and the problem)."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path}: 'format' must be {FORMAT!r}")
    version = document.get("format_version")
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (expected one of {list(SUPPORTED_FORMAT_VERSIONS)})")
    try:
        return _calibration(document), ModelFingerprint(**document["model"])
    except (KeyError, TypeError, ValueError, InvalidInputError) as exc:
        raise CheckpointError(f"{path}: bad calibration: {exc!r}") from exc


def load_calibration(directory: str | Path, scorer: Any) -> tuple[Calibration | None, str]:
    """(the directory's calibration if it matches the loaded scorer, else None; a note saying which or why not)."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        return None, f"{path.parent} has no {CALIBRATION_FILE} (measure one with `rewardsvc calibrate`)"
    calibration, measured = read_calibration(path)
    why = measured.mismatch(fingerprint_of(scorer))
    if why is None and tuple(calibration.rewards) != tuple(scorer.attributes):
        why = f"has attributes {list(calibration.rewards)}, the model {list(scorer.attributes)}"
    if why is not None:
        return None, f"{path} does not match the loaded model ({why}); rerun `rewardsvc calibrate`"
    return calibration, f"{path} ({calibration.calibration_id})"


def calibration_summary(calibration: Calibration | None, note: str) -> dict[str, Any]:
    """What GetModelInfo reports: the statistics and where they come from, or why there are none."""
    if calibration is None:
        return {"available": False, "note": note}
    return {
        "available": True,
        "calibration_id": calibration.calibration_id,
        "count": calibration.count,
        "score": calibration.score.__dict__,
        "rewards": {a: s.__dict__ for a, s in calibration.rewards.items()},
        **dict(calibration.info),
        "note": note,
    }
