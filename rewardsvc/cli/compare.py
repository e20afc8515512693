"""`rewardsvc compare PAIRS`: P(chosen preferred) = sigmoid(s_chosen - s_rejected) for each
(prompt, chosen, rejected) row, locally or through `--server`. Output rows keep input order; the output
file is resumable like score's (re-run to continue, --overwrite to start afresh)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidInputError, RewardError
from ..types import CompareResult, ScoreResult

uses_model = True

INPUT_FORMAT = """\
input (.jsonl or .parquet), one row per preference pair (the rows `rewardsvc eval` reads):
  {"id": ..., "prompt": str | messages ending with a user turn,
   "chosen": str | messages, "rejected": str | messages}
  (without "prompt", the messages before chosen's last turn are the prompt)
output (.jsonl or .parquet; stdout when -o is absent), one row per input row, in input order:
  {"id", "p_chosen", "score_chosen", "score_rejected", "model_id"}
  a row that cannot be scored: {"id", "line", "error"} (exit code 1)
  + "input_sha256" in a file output: the content hash of the row's input (checked when resuming)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .score_sources import add_server_arguments

    parser.add_argument("pairs", help="preference pairs, .jsonl or .parquet (format below)")
    parser.add_argument("-o", "--output", help="output .jsonl or .parquet (default: stdout)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming an existing output")
    parser.add_argument("--format", choices=["jsonl", "table"], default="jsonl", help="stdout format without -o")
    parser.add_argument("--weights", help='steer: {"mode": "override"|"mask", "values": {attribute: weight}}')
    parser.add_argument("--chunk-size", type=int, default=128, help="pairs scored and written together (default %(default)s)")
    add_server_arguments(parser)


def pair_conversations(row: dict[str, Any]) -> tuple[list, list]:
    """(chosen conversation, rejected conversation), parsed as `rewardsvc eval` parses pairs."""
    from ..model.conversation import validate_conversation
    from ..training.data.schema import PreferencePair

    for name in ("chosen", "rejected"):
        if name not in row:
            raise InvalidInputError(f"a pair row needs {name!r}", field=name)
    pair = PreferencePair.from_json(row)
    return tuple(validate_conversation([*pair.prompt, {"role": "assistant", "content": text}], name)
                 for name, text in (("chosen", pair.chosen), ("rejected", pair.rejected)))  # fmt: skip


def compare_rows(chunk: Sequence, source) -> list[dict[str, Any]]:
    """One output row per input row of the chunk; both conversations of every pair in one call to the score source."""
    from .score_pipeline import conversation_key

    parsed: list[Any] = []
    for raw in chunk:
        if raw.error is not None:
            parsed.append(raw.error)
            continue
        try:
            parsed.append(pair_conversations(raw.data))
        except (RewardError, TypeError, KeyError) as exc:
            parsed.append(f"line {raw.line}: {exc}")
    unique = {conversation_key(c): c for p in parsed if not isinstance(p, str) for c in p}
    outcomes = dict(zip(unique, source.score(list(unique.values())))) if unique else {}
    rows = []
    for raw, p in zip(chunk, parsed):
        if isinstance(p, str):
            rows.append({"id": raw.id, "line": raw.line, "error": p})
            continue
        chosen, rejected = (outcomes[conversation_key(c)] for c in p)
        bad = next((o for o in (chosen, rejected) if not isinstance(o, ScoreResult)), None)
        if bad is not None:
            rows.append({"id": raw.id, "line": raw.line, "error": f"line {raw.line}: {bad}"})
            continue
        pair = CompareResult.of(chosen, rejected)
        rows.append({"id": raw.id, "p_chosen": pair.p_chosen, "score_chosen": pair.score_chosen,
                     "score_rejected": pair.score_rejected, "model_id": chosen.model_id})  # fmt: skip
    return rows


def compare_table(rows: Sequence[dict[str, Any]]) -> str:
    from .tables import render

    body = [[str(r.get("id")), "error", "", "", r["error"]] if "error" in r else
            [str(r["id"]), f"{r['p_chosen']:.3f}", f"{r['score_chosen']:+.4f}", f"{r['score_rejected']:+.4f}", ""]
            for r in rows]  # fmt: skip
    return render(["id", "P(chosen)", "score chosen", "score rejected", "error"], body, align="lrrrl")


def run(args: argparse.Namespace) -> int:
    from .score_sources import open_score_source
    from .main import parse_weights
    from .batch_io import ResumableWriter, check_output, read_rows

    if args.output is not None:
        check_output(args.output)
        if args.format == "table":
            raise InvalidInputError("--format table prints to stdout; drop -o (or use --format jsonl)", field="format")
    if args.chunk_size < 1:
        raise InvalidInputError(f"--chunk-size must be >= 1, got {args.chunk_size}", field="chunk_size")
    inputs = read_rows(args.pairs, "pairs")
    weights = parse_weights(args.weights)
    source, _ = open_score_source(args, weights)
    errors, shown = 0, []
    writer = ResumableWriter(args.output, inputs, args.overwrite) if args.output else None
    try:
        start = writer.done if writer else 0
        errors = writer.done_errors if writer else 0
        for i in range(start, len(inputs), args.chunk_size):
            rows = compare_rows(inputs[i : i + args.chunk_size], source)
            errors += sum("error" in r for r in rows)
            if writer:
                writer.write(rows)
            else:
                shown += rows
        if writer:
            writer.finish()
    finally:
        if writer:
            writer.close()
        source.close()
    if writer is None:
        import json

        text = compare_table(shown) if args.format == "table" else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in shown)
        sys.stdout.write(text.rstrip("\n") + "\n" if text else "")
    print(f"compare: {len(inputs)} pairs, {errors} errors", file=sys.stderr)
    return 1 if errors else 0
