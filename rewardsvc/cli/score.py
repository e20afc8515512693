"""`rewardsvc score INPUT -o OUTPUT`: resumable batch scoring, JSONL or Parquet in and out.

The command only: flags, file checks, then one run of the pipeline (`score_pipeline.score_rows`), or, under
torchrun, one shard of it per rank (`sharded.run_sharded`).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import InvalidInputError

uses_model = True

INPUT_FORMAT = """\
input (.jsonl or .parquet), one row per conversation:
  {"id": ..., "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
      the last message is the assistant response to score
  {"id": ..., "prompt": str | messages, "response": str}
output (.jsonl or .parquet; stdout when -o is absent), one row per input row, in input order:
  {"id", "score", "rewards", "gating", "coefficients", "num_tokens", "truncated", "weights_source", "model_id"}
  + "normalized": {"score", "rewards", "calibration_id", "clip"} with --normalize (score/rewards stay raw)
  + "group": {"key", "size", "mean", "std", "rank"} with --group-by
  a row that cannot be scored: {"id", "line", "error"} (the others are still scored; exit code 1)
  + "input_sha256" in a file output: the content hash of the row's input (checked when resuming)
resuming: re-run the same command to continue after the last complete row (--overwrite starts afresh); a kept
  row whose input was edited since stops the run, naming the row
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .score_sources import add_server_arguments
    from .ray_data import add_ray_arguments

    parser.add_argument("input", help="conversations, .jsonl or .parquet (format below)")
    parser.add_argument("-o", "--output", help="output .jsonl or .parquet (default: JSONL on stdout, not resumable)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming an existing output")
    parser.add_argument("--format", choices=["jsonl", "table"], default="jsonl",
                        help="stdout format when there is no -o: jsonl (default) or a table for people")  # fmt: skip
    parser.add_argument("--group-by", metavar="FIELD",
                        help="rows with the same value of FIELD (and the same prompt) are scored as one group")  # fmt: skip
    parser.add_argument("--weights", help='steer: {"mode": "override"|"mask", "values": {attribute: weight}}')
    from .main import add_normalization_arguments

    add_normalization_arguments(parser)
    parser.add_argument("--chunk-size", type=int, default=256, metavar="N", help="rows scored and written together (default %(default)s)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: on when stderr is a terminal)")  # fmt: skip
    add_server_arguments(parser)
    add_ray_arguments(parser)


# ---- the command --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from .score_sources import open_score_source
    from .main import parse_normalization, parse_weights
    from .batch_io import check_output, read_rows
    from .score_pipeline import score_rows

    if args.ray is not None:  # the same rows scored by a Ray actor pool (cli/ray_data.py)
        from .ray_data import run_ray

        return run_ray(args)
    # Everything about the files is checked before the model loads (seconds) or the output is touched.
    if args.output is not None:
        check_output(args.output)
        if args.format == "table":
            raise InvalidInputError("--format table prints to stdout; drop -o (or use --format jsonl)", field="format")
    inputs = read_rows(args.input, "input")
    weights = parse_weights(args.weights)
    normalization = parse_normalization(args)
    from .sharded import run_sharded, torchrun_job

    job = torchrun_job()
    if job.size > 1:  # under torchrun: this rank scores its shard (cli/sharded.py)
        return run_sharded(args, inputs, weights, job)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    source, description = open_score_source(args, weights, normalization)
    try:
        summary = score_rows(inputs, args.output, source, chunk_size=args.chunk_size, group_by=args.group_by,
                             overwrite=args.overwrite, progress=progress, table=args.format == "table")  # fmt: skip
    finally:
        source.close()
    summary.source = description
    print(summary.line(), file=sys.stderr)
    return 1 if summary.errors else 0
