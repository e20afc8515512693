"""The resumable batch-scoring pipeline behind `rewardsvc score`: `score_rows(inputs, output, source)` (also the
unit a sharded run calls once per shard).

Rows are taken in input order, chunk by chunk; in each chunk identical conversations are scored once (and
never again later in the run), `--group-by` groups go through the source's group path, and the chunk's
output rows are appended and fsynced before the next chunk starts (see batch_io for resuming).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import InvalidInputError, RewardError
from ..model.conversation import Messages
from ..types import GroupResult, ScoreResult
from .batch_io import RawRow, conversation_of


@dataclass
class Summary:
    rows: int = 0  # input rows
    resumed: int = 0  # rows an earlier run had written
    written: int = 0  # rows written by this run
    unique: int = 0  # conversations sent to the model by this run
    tokens: int = 0  # their tokens
    errors: int = 0  # error rows in the whole output
    seconds: float = 0.0
    source: str = ""
    output: str = "stdout"

    def line(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        token_rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        resumed = f", resumed after row {self.resumed}" if self.resumed else ""
        return (
            f"score: {self.rows} rows{resumed}; {self.written} written ({self.unique} unique conversations scored, "
            f"{self.tokens} tokens) in {self.seconds:.1f} s: {rate:.1f} rows/s, {token_rate:.0f} tokens/s; "
            f"{self.errors} errors; {self.source} -> {self.output}"
        )


@dataclass
class PreparedRow:
    """One input row after validation: its conversation, or the error row to write instead."""

    raw: RawRow
    messages: Messages | None = None
    key: str | None = None  # canonical conversation: identical conversations share it
    error: str | None = None
    group: str | None = None  # canonical value of the --group-by field


def conversation_key(messages: Messages) -> str:
    return json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def prepare_rows(rows: Sequence[RawRow], group_by: str | None) -> list[PreparedRow]:
    out = []
    prompts: dict[str, tuple[str, int]] = {}  # group -> (prompt key, line of its first row)
    for raw in rows:
        if raw.error is not None:
            out.append(PreparedRow(raw, error=raw.error))
            continue
        try:
            messages = conversation_of(raw.data)
        except RewardError as exc:
            out.append(PreparedRow(raw, error=f"{raw.where}: {exc}"))
            continue
        p = PreparedRow(raw, messages, conversation_key(messages))
        if group_by is not None:
            if group_by not in raw.data:
                p.error = f"{raw.where}: --group-by field {group_by!r} is missing"
            else:
                p.group = json.dumps(raw.data[group_by], sort_keys=True)
                prompt = conversation_key(messages[:-1])
                first = prompts.setdefault(p.group, (prompt, raw.line))
                if first[0] != prompt:
                    p.error = (f"{raw.where}: its prompt differs from the prompt of line {first[1]}, the first row of "
                               f"--group-by {group_by}={raw.data[group_by]!r}; a group shares one prompt")  # fmt: skip
        out.append(p)
    return out


def result_row(row_id: Any, result: ScoreResult) -> dict[str, Any]:
    """One output row: the row's id and every ScoreResult field (`normalized` only when normalization applied)."""
    row = {"id": row_id, **asdict(result)}
    if row["normalized"] is None:
        del row["normalized"]
    return row


def _error_row(p: PreparedRow, error: str) -> dict[str, Any]:
    return {"id": p.raw.id, "line": p.raw.line, "error": error}


class ScoresOfRun:
    """Results by conversation key (each conversation scored once per run) and group statistics. Memory:
    one result per distinct conversation of the run (a few hundred bytes per attribute set)."""

    def __init__(self, source, prepared: list[PreparedRow]):
        self.source = source
        self.by_key: dict[str, ScoreResult | RewardError] = {}
        self.group_stats: dict[str, dict[int, dict[str, Any]]] = {}  # group -> id(row) -> that row's "group" field
        self.members: dict[str, list[PreparedRow]] = {}
        for p in prepared:
            if p.group is not None and p.error is None:
                self.members.setdefault(p.group, []).append(p)
        self.unique = self.tokens = 0

    def _record(self, keys: list[str], outcomes: list) -> None:
        for key, outcome in zip(keys, outcomes):
            self.by_key[key] = outcome
            if isinstance(outcome, ScoreResult):
                self.tokens += outcome.num_tokens
        self.unique += len(keys)

    def score_missing(self, chunk: list[PreparedRow]) -> None:
        for group in dict.fromkeys(p.group for p in chunk if p.group is not None and p.error is None):
            if group not in self.group_stats:
                self._score_group(group)
        flat = [p.key for p in chunk if p.error is None and p.group is None and p.key not in self.by_key]
        keys = list(dict.fromkeys(flat))
        if keys:
            wanted = set(keys)
            by_key = {p.key: p.messages for p in chunk if p.key in wanted}
            self._record(keys, self.source.score([by_key[k] for k in keys]))

    def _score_group(self, group: str) -> None:
        """The whole group at once (also its rows in later chunks): the statistics need every member."""
        members = self.members[group]
        todo = list(dict.fromkeys(p.key for p in members if p.key not in self.by_key))
        if todo:
            messages = {p.key: p.messages for p in members}
            prompt = messages[todo[0]][:-1]
            self._record(todo, self.source.score_group(prompt, [messages[k][-1]["content"] for k in todo]))
        scored = [p for p in members if isinstance(self.by_key[p.key], ScoreResult)]
        stats = GroupResult.of([self.by_key[p.key] for p in scored])
        self.group_stats[group] = {
            id(p): {"key": json.loads(group), "size": len(scored), "mean": stats.mean, "std": stats.std, "rank": rank}
            for p, rank in zip(scored, stats.ranks)
        }

    def row(self, p: PreparedRow) -> dict[str, Any]:
        if p.error is not None:
            return _error_row(p, p.error)
        outcome = self.by_key[p.key]
        if isinstance(outcome, RewardError):
            return _error_row(p, f"{p.raw.where}: {outcome}")
        row = result_row(p.raw.id, outcome)
        if p.group is not None:
            row["group"] = self.group_stats[p.group][id(p)]
        return row


def score_chunk(rows: Sequence[RawRow], source) -> list[dict[str, Any]]:
    """The output rows of `rows`, in order, with nothing written: the unit one Ray Data batch runs
    (cli/ray_data.py). The same validation, error rows and deduplication as score_rows (no --group-by)."""
    prepared = prepare_rows(rows, None)
    scores = ScoresOfRun(source, prepared)
    scores.score_missing(prepared)
    return [scores.row(p) for p in prepared]


@dataclass
class _Progress:
    enabled: bool
    total: int
    initial: int
    bar: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, unit="row", file=sys.stderr, dynamic_ncols=True)

    def update(self, rows: int, tokens: int, seconds: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{tokens / max(seconds, 1e-9):.0f} tokens/s", refresh=False)
            self.bar.update(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def score_rows(
    inputs: Sequence[RawRow],
    output: str | Path | None,
    source,
    *,
    chunk_size: int = 256,
    group_by: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    stdout: TextIO | None = None,
    table: bool = False,
) -> Summary:
    """Score `inputs` into `output` (.jsonl / .parquet; None = stdout), resuming a previous run's output.
    Returns the run's summary; every input row ends up in the output exactly once, in input order."""
    from .batch_io import ResumableWriter
    from .batch_io import StdoutWriter

    if chunk_size < 1:
        raise InvalidInputError(f"--chunk-size must be >= 1, got {chunk_size}", field="chunk_size")
    started = time.monotonic()
    writer = StdoutWriter(stdout or sys.stdout, table) if output is None else ResumableWriter(output, inputs, overwrite)
    summary = Summary(rows=len(inputs), resumed=writer.done, errors=writer.done_errors,
                      output=str(output) if output is not None else "stdout")  # fmt: skip
    prepared = prepare_rows(inputs, group_by)
    scores = ScoresOfRun(source, prepared)
    bar = _Progress(progress, len(inputs), writer.done)
    try:
        for start in range(writer.done, len(prepared), chunk_size):
            chunk = prepared[start : start + chunk_size]
            scores.score_missing(chunk)
            rows = [scores.row(p) for p in chunk]
            writer.write(rows)
            summary.errors += sum("error" in r for r in rows)
            summary.written += len(rows)
            bar.update(len(rows), scores.tokens, time.monotonic() - started)
        writer.finish()
    finally:
        writer.close()
        bar.close()
    summary.unique, summary.tokens = scores.unique, scores.tokens
    summary.seconds = time.monotonic() - started
    return summary
