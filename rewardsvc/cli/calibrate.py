"""`rewardsvc calibrate [INPUT]`: measure the mean and standard deviation of the score and of each attribute's
reward on a reference set, and store them with the model (calibration.json in its directory), so that every
server of that model normalizes alike (`rewardsvc serve --normalize`, a request's `normalization`).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from ..errors import InvalidInputError

uses_model = True

PACKAGED_REFERENCE = Path(__file__).resolve().parents[1] / "samples" / "calibration_reference.jsonl"

INPUT_FORMAT = f"""\
input (.jsonl or .parquet; default: the packaged reference set {PACKAGED_REFERENCE.name}), one row per conversation,
the `rewardsvc score` row format:
  {{"id": ..., "messages": [...]}}  or  {{"id": ..., "prompt": str | messages, "response": str}}
every row must score (a row that does not stops the command, naming its line: nothing is left out silently)
output: calibration.json in the model's directory (--model, default the packaged model), read when the model
  loads; prints the calibration id and the statistics
the packaged reference set: 256 conversations, the chosen and the rejected response of 128 pairs of the default
  recipe's stage-2 validation split (held out from fitting the heads; chat and safety; sources in turn),
  written by training/build_calibration_reference.py
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", default=None,
                        help="reference conversations, .jsonl or .parquet (default: the packaged reference set)")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=64, metavar="N", help="conversations per scorer call (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="measure and print, but do not write calibration.json")


def _reference_name(path: Path) -> str:
    """How the reference set is named in calibration.json: `packaged:<file>` for the packaged set (so the stored
    file does not name this machine's install path), else the path as given."""
    return f"packaged:{path.name}" if path.resolve() == PACKAGED_REFERENCE.resolve() else str(path)


def model_directory(args: argparse.Namespace) -> Path:
    from ..model.hub import resolve_model_path
    from ..model.scorer import DEFAULT_MODEL_DIR

    return resolve_model_path(args.model, "--model") if args.model else DEFAULT_MODEL_DIR


def conversations_of(path: Path) -> list:
    from .batch_io import conversation_of
    from .batch_io import read_rows

    out = []
    for raw in read_rows(path, "input"):
        if raw.error is not None:
            raise InvalidInputError(f"input: {raw.error}", field="input")
        try:
            out.append(conversation_of(raw.data))
        except InvalidInputError as exc:
            raise InvalidInputError(f"input: line {raw.line}: {exc}", field="input") from exc
    return out


def score_all(scorer, conversations: list, chunk_size: int) -> list:
    """Raw (gating-weighted) results, in input order; a conversation that does not encode stops the run."""
    encoded = [scorer.encode(c, f"input row {i + 1}") for i, c in enumerate(conversations)]
    results = []
    for start in range(0, len(encoded), chunk_size):
        results += scorer.score_encoded(encoded[start : start + chunk_size])
        print(f"calibrate: {len(results)}/{len(encoded)} conversations scored", file=sys.stderr)
    return results


def run(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..model.backbone_loading import file_sha256
    from ..model.calibration import fingerprint_of, measure, save_calibration
    from .main import load_scorer

    if args.chunk_size < 1:
        raise InvalidInputError(f"--chunk-size must be >= 1, got {args.chunk_size}", field="chunk_size")
    path = Path(args.input) if args.input else PACKAGED_REFERENCE
    conversations = conversations_of(path)  # before the model loads: a bad file fails in a second
    directory = model_directory(args)
    scorer = load_scorer(args)
    results = score_all(scorer, conversations, args.chunk_size)
    reference = {"path": _reference_name(path), "sha256": file_sha256(path), "rows": len(conversations)}
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    calibration, document = measure(results, scorer.attributes, fingerprint_of(scorer), reference, created, __version__)
    print(f"calibration {calibration.calibration_id}: {calibration.count} conversations of {reference['path']}")
    print(f"  score: mean {calibration.score.mean:.6g} std {calibration.score.std:.6g}")
    for name, s in calibration.rewards.items():
        print(f"  {name}: mean {s.mean:.6g} std {s.std:.6g}")
    if args.dry_run:
        return 0
    written = save_calibration(directory, document)
    print(f"wrote {written}")
    return 0
