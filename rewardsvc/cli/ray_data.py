"""Batch scoring on Ray Data: the `rewardsvc score` pipeline inside a Ray actor pool.

    import ray
    from rewardsvc.cli.ray_data import ScoreBatches

    ds = ray.data.read_parquet("s3://bucket/conversations/")          # rows as `rewardsvc score` reads them
    scored = ds.map_batches(ScoreBatches, fn_constructor_kwargs={"model": "/models/heads"},
                            batch_size=256, batch_format="pyarrow", concurrency=4, num_gpus=1)
    scored.write_parquet("s3://bucket/scores/")

Each actor loads the scorer once (in `__init__`) and scores every batch it is given with the local CLI's own row
pipeline (`score_pipeline.score_chunk`): the same row formats in, the same output columns out, and a row that cannot be
scored becomes an error row `{"id", "line", "error"}` instead of failing the batch. Batches may be pyarrow
tables or pandas frames.

It lives in cli/ (not integrations/, which must stay torch-free on the trainer side) because it is the batch
command run on Ray: `rewardsvc score --ray [ADDRESS] IN -o OUT` (run_ray below) uses the same class.

Fault tolerance: an actor that dies (a killed process, a lost node) is restarted by Ray and the batch it held
is run again: Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1 (ray 2.60,
ray/data/_internal/execution/operators/actor_pool_map_operator.py); a batch's output is only taken once the
batch finished, so every input row is in the output exactly once (tests/on_ray/test_ray_data.py kills one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..types import AttributeWeights
from .batch_io import INPUT_HASH_FIELD, RawRow, input_sha256

# Columns of the table the CLI driver hands to the actors: each input row as JSON text (or its read error) plus
# its position, so that bad lines become error rows exactly as in the local CLI and the output keeps input order.
ORDER_COLUMN = "_rewardsvc_order"
LINE_COLUMN = "_rewardsvc_line"
RAW_COLUMN = "_rewardsvc_raw"  # the row as JSON text; null when the line did not parse
READ_ERROR_COLUMN = "_rewardsvc_read_error"
OUTPUT_COLUMN = "_rewardsvc_output"  # the output row as JSON text (driver mode only)

RESULT_FIELDS = ("score", "rewards", "gating", "coefficients", "num_tokens", "truncated", "weights_source", "model_id")


def model_args(**overrides: Any) -> argparse.Namespace:
    """The model flags of `rewardsvc score` with their defaults, then `overrides` (keys are the flags' dest
    names: model, backbone, device, dtype, max_tokens, truncation, token_budget, batch_plan, ...)."""
    from .main import add_model_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_model_arguments(parser)
    args = parser.parse_args([])
    unknown = set(overrides) - set(vars(args))
    if unknown:
        raise InvalidInputError(f"ScoreBatches: unknown model option(s) {sorted(unknown)}; known: {sorted(vars(args))}",
                                field=sorted(unknown)[0])  # fmt: skip
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def _plain(value: Any) -> Any:
    """pandas / numpy values -> the plain Python values a JSON row would hold (pandas gives numpy arrays for list
    columns and numpy scalars for numbers)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    if tolist is not None and not isinstance(value, (str, bytes)):
        return _plain(tolist())
    return value


def _records(batch: Any) -> list[dict[str, Any]]:
    """A pyarrow Table or a pandas DataFrame -> plain row dicts; a column a row does not use (None, or NaN in a
    float column of pandas) is dropped from that row, as when the local CLI reads Parquet."""
    if hasattr(batch, "to_pylist"):
        rows = batch.to_pylist()
    elif hasattr(batch, "to_dict"):
        rows = [_plain(r) for r in batch.to_dict(orient="records")]
    elif isinstance(batch, dict):  # batch_format="numpy": {column: array}
        columns = {k: _plain(v) for k, v in batch.items()}
        n = len(next(iter(columns.values()))) if columns else 0
        rows = [{k: v[i] for k, v in columns.items()} for i in range(n)]
    else:
        raise InvalidInputError(f"ScoreBatches: a batch must be a pyarrow Table, pandas DataFrame or dict of arrays, "
                                f"got {type(batch).__name__}", field="batch_format")  # fmt: skip
    return [{k: v for k, v in r.items() if v is not None and not (isinstance(v, float) and math.isnan(v))} for r in rows]


class ScoreBatches:
    """Callable class for `Dataset.map_batches`: loads the scorer once per actor, scores each batch.

    model / weights: as `rewardsvc score --model/--weights` (weights: an AttributeWeights or its JSON dict).
    line_column: a column holding each row's line number (error rows then name it, as the local CLI does);
    without it an error row names the row's id and its "line" is null.
    model_options: any other model flag of `rewardsvc score` by its dest name (device, dtype, max_tokens,
    truncation, token_budget, batch_plan, batch_invariant, backbone, adapter, ...)."""

    def __init__(self, model: str | None = None, *, weights: AttributeWeights | dict | None = None,
                 line_column: str | None = None, **model_options: Any):  # fmt: skip
        from .score_sources import LocalSource
        from .main import load_scorer

        weights = AttributeWeights.of(weights)
        scorer = load_scorer(model_args(model=model, **model_options))
        if weights is not None:
            weights.check_attributes(scorer.attributes)
        self.backend = LocalSource(scorer, weights)
        self.attributes = tuple(scorer.attributes)
        self.line_column = line_column

    def __call__(self, batch: Any):
        from .score_pipeline import score_chunk

        records = _records(batch)
        if records and ORDER_COLUMN in records[0]:
            return self._driver_batch(records, score_chunk)
        rows = []
        for r in records:
            line = r.pop(self.line_column, None) if self.line_column else None
            rows.append(RawRow(int(line) if line is not None else None, r))
        return self._table(score_chunk(rows, self.backend))

    def _driver_batch(self, records: list[dict[str, Any]], score_chunk):
        """Rows shipped by run_ray: JSON text in, JSON text out (the driver writes them as the local CLI does)."""
        import pyarrow as pa

        rows = []
        for r in records:
            line = r[LINE_COLUMN]
            if RAW_COLUMN in r:
                rows.append(RawRow(line, json.loads(r[RAW_COLUMN])))
            else:
                rows.append(RawRow(line, None, r[READ_ERROR_COLUMN]))
        out = score_chunk(rows, self.backend)
        return pa.table({
            ORDER_COLUMN: pa.array([r[ORDER_COLUMN] for r in records], pa.int64()),
            OUTPUT_COLUMN: pa.array([json.dumps(o, ensure_ascii=False) for o in out], pa.string()),
        })  # fmt: skip

    def _table(self, out: Sequence[dict[str, Any]]):
        """One schema for every batch (a batch of only error rows has the score columns too, all null), so that
        Ray Data can concatenate and write the blocks."""
        import pyarrow as pa

        named = pa.struct([(a, pa.float64()) for a in self.attributes])
        types = {"score": pa.float64(), "rewards": named, "gating": named, "coefficients": named,
                 "num_tokens": pa.int64(), "truncated": pa.bool_(), "weights_source": pa.string(),
                 "model_id": pa.string(), "line": pa.int64(), "error": pa.string()}  # fmt: skip
        columns = {"id": pa.array([o.get("id") for o in out])}
        for name, kind in types.items():
            columns[name] = pa.array([o.get(name) for o in out], kind)
        return pa.table(columns)


# ---- `rewardsvc score --ray` --------------------------------------------------------------------------------


def input_files(path: str | Path) -> list[Path]:
    """A .jsonl / .parquet file, or every such file of a directory (sorted by name)."""
    from .batch_io import FORMATS

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise InvalidInputError(f"input: {path} holds no {' or '.join(FORMATS)} files", field="input")
        return files
    return [path]


def read_inputs(path: str | Path) -> list[RawRow]:
    """Every row of every input file, in order (line numbers are per file, as the local CLI counts them)."""
    from .batch_io import read_rows

    return [row for f in input_files(path) for row in read_rows(f, "input")]


def driver_blocks(inputs: Sequence[RawRow], rows_per_block: int) -> list[Any]:
    """The input as pyarrow tables of `rows_per_block` rows: several blocks, so that several actors work at once."""
    import pyarrow as pa

    blocks = []
    for start in range(0, len(inputs), rows_per_block):
        part = inputs[start : start + rows_per_block]
        blocks.append(pa.table({
            ORDER_COLUMN: pa.array(range(start, start + len(part)), pa.int64()),
            LINE_COLUMN: pa.array([r.line for r in part], pa.int64()),
            RAW_COLUMN: pa.array([None if r.error else json.dumps(r.data, ensure_ascii=False) for r in part], pa.string()),
            READ_ERROR_COLUMN: pa.array([r.error for r in part], pa.string()),
        }))  # fmt: skip
    return blocks


def score_on_ray(inputs: Sequence[RawRow], *, actors: int, batch_size: int, scorer_kwargs: dict[str, Any],
                 cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, progress: bool = False,
                 scorer_class: type = ScoreBatches) -> list[dict[str, Any]]:  # fmt: skip
    """The output rows of `inputs`, in input order, scored by `actors` Ray actors (Ray must be initialised).
    `scorer_class` is ScoreBatches or a subclass of it. Each row carries its input's content hash, as the local
    CLI's file output does, so the two outputs have the same columns."""
    import ray

    if not inputs:
        return []
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ds = ray.data.from_arrow(driver_blocks(inputs, batch_size))
    scored = ds.map_batches(scorer_class, fn_constructor_kwargs=scorer_kwargs, batch_size=batch_size,
                            batch_format="pyarrow", concurrency=actors, num_cpus=cpus_per_actor,
                            num_gpus=gpus_per_actor)  # fmt: skip
    out: list[Any] = [None] * len(inputs)
    seen = 0
    for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
        for order, text in zip(batch[ORDER_COLUMN].to_pylist(), batch[OUTPUT_COLUMN].to_pylist()):
            if out[order] is not None:
                raise RuntimeError(f"Ray returned input row {order} twice")  # never expected: guards the claim
            out[order] = {**json.loads(text), INPUT_HASH_FIELD: input_sha256(inputs[order])}
            seen += 1
    if seen != len(inputs):
        raise RuntimeError(f"Ray returned {seen} of {len(inputs)} rows")
    return out


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ray Data (instead of this process)")
    g.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", default=None,
                   help="score on a Ray cluster: ADDRESS (e.g. auto, ray://head:10001), $RAY_ADDRESS, or a local Ray "
                        "when neither is given; INPUT may be a directory of .jsonl/.parquet files")  # fmt: skip
    g.add_argument("--ray-actors", type=int, default=1, metavar="N", help="actors scoring at once (default %(default)s)")
    g.add_argument("--ray-cpus-per-actor", type=float, default=1.0, metavar="N", help="default %(default)s")
    g.add_argument("--ray-gpus-per-actor", type=float, default=0.0, metavar="N",
                   help="GPUs per actor (default %(default)s; 1 puts each actor on its own GPU)")  # fmt: skip


def run_ray(args: argparse.Namespace) -> int:
    """`rewardsvc score --ray`: read INPUT (file or directory) here, score on Ray, write OUTPUT here."""
    from .main import parse_weights
    from .score_pipeline import Summary
    from .batch_io import check_output, file_format, write_parquet

    if args.output is None:
        raise InvalidInputError("-o/--output is required with --ray (a .parquet or .jsonl file)", field="output")
    if args.server:
        raise InvalidInputError("--ray scores with actors that load the model; drop --server", field="ray")
    if args.group_by:
        raise InvalidInputError("--group-by is not supported with --ray (a group may span Ray batches); "
                                "score groups locally or through --server", field="group_by")  # fmt: skip
    if args.ray_actors < 1:
        raise InvalidInputError(f"--ray-actors must be >= 1, got {args.ray_actors}", field="ray_actors")
    if args.chunk_size < 1:
        raise InvalidInputError(f"--chunk-size must be >= 1, got {args.chunk_size}", field="chunk_size")
    check_output(args.output)
    inputs = read_inputs(args.input)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        # A Ray job is not resumable row by row (Ray retries failed batches instead); never mix two runs.
        raise InvalidInputError(f"--output: {output} exists; pass --overwrite to replace it", field="output")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    options = {k: getattr(args, k) for k in vars(model_args()) if k != "model"}
    weights = parse_weights(args.weights)  # checked here, before any actor starts
    plain_weights = None if weights is None else {"mode": weights.mode, "values": dict(weights.values)}
    scorer_kwargs = {"model": args.model, "weights": plain_weights, **options}
    import ray

    started = time.monotonic()
    owned = not ray.is_initialized()  # a caller (a notebook, a test) that already joined a cluster keeps it
    if owned:
        ray.init(address=args.ray or None, log_to_driver=False)
    try:
        rows = score_on_ray(inputs, actors=args.ray_actors, batch_size=args.chunk_size, scorer_kwargs=scorer_kwargs,
                            cpus_per_actor=args.ray_cpus_per_actor, gpus_per_actor=args.ray_gpus_per_actor,
                            progress=progress)  # fmt: skip
    finally:
        if owned:
            ray.shutdown()
    tmp = output.with_name(output.name + ".tmp")
    if file_format(output, "--output") == "parquet":
        write_parquet(rows, tmp)
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(output)  # OUT is absent or complete
    errors = sum("error" in r for r in rows)
    summary = Summary(rows=len(inputs), written=len(rows), errors=errors, seconds=time.monotonic() - started,
                      source=f"Ray {args.ray or 'local'} x{args.ray_actors} actors", output=str(output))  # fmt: skip
    summary.tokens = sum(r.get("num_tokens", 0) for r in rows)
    summary.unique = len(rows) - errors
    print(summary.line(), file=sys.stderr)
    return 1 if errors else 0
