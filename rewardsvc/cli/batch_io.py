"""The files of the batch commands: input rows (JSONL and Parquet; RawRow, conversation_of), output (JSONL and
Parquet, resumable; or stdout), in one place.

Output is resumable: rows are appended in input order and made durable (flush + fsync) chunk by chunk, so a
run killed at any point (even SIGKILL) leaves a prefix of complete rows plus at most one torn line. On
restart `ResumableWriter` keeps the complete rows, drops the torn tail, checks that the rows kept are the
input's first rows (same ids, in order) and reports how many are done; the caller scores only the rest.

Parquet output cannot be appended to durably row by row (a Parquet file is only readable once its footer
is written), so it goes through a JSONL sidecar `OUT.parquet.partial.jsonl` with exactly the JSONL rules
above. When every row is written the sidecar is converted to `OUT.parquet` (written to a temporary file,
then renamed, so `OUT.parquet` is either absent or complete) and the sidecar is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..errors import InvalidInputError, RewardError
from ..model.conversation import Messages, as_prompt, validate_conversation, with_response

# ---- rows ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawRow:
    line: int | None  # 1-based line number in the file (None: a Ray Data row whose dataset carries no line column)
    data: dict[str, Any] | None  # None when the line is not a JSON object
    error: str | None = None

    @property
    def id(self) -> Any:
        return self.data.get("id") if self.data else None

    @property
    def where(self) -> str:
        """How an error message names this row: its line, or its id when the line is unknown."""
        return f"line {self.line}" if self.line is not None else f"row id {self.id!r}"


def read_jsonl(path: str | Path) -> Iterator[RawRow]:
    """Every non-blank line as a RawRow; a line that is not a JSON object becomes a row with an error
    (never skipped silently)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RawRow(number, None, f"line {number} is not valid JSON: {exc}")
                continue
            if not isinstance(data, dict):
                yield RawRow(number, None, f"line {number} must be a JSON object, got {type(data).__name__}")
                continue
            yield RawRow(number, data)


def conversation_of(row: dict[str, Any]) -> Messages:
    """`{"messages": [...]}` or `{"prompt": str | messages, "response": str}` -> validated messages."""
    if "messages" in row:
        if "response" in row or "prompt" in row:
            raise InvalidInputError("a row has either 'messages' or 'prompt' + 'response', not both", field="messages")
        return validate_conversation(row["messages"], "messages")
    if "prompt" in row and "response" in row:
        return with_response(as_prompt(row["prompt"], "prompt"), row["response"], "response")
    raise InvalidInputError("a row needs 'messages', or 'prompt' and 'response'", field="messages")


# ---- file formats ---------------------------------------------------------------------------------------------

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
SIDECAR_SUFFIX = ".partial.jsonl"


def file_format(path: str | Path, flag: str) -> str:
    """'jsonl' or 'parquet' from the file name; anything else is an error naming the flag (checked before
    any model loads)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InvalidInputError(
            f"{flag}: {path}: unknown file type {suffix or '(none)'!r}; use one of {', '.join(FORMATS)}", field=flag
        )
    return FORMATS[suffix]


def check_output(path: str | Path, flag: str = "--output") -> str:
    """The output's format, and that its directory exists: both before any model loads."""
    kind = file_format(path, flag)
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise InvalidInputError(f"{flag}: the directory {parent} does not exist", field=flag)
    return kind


# ---- input ------------------------------------------------------------------------------------------------


def read_rows(path: str | Path, flag: str = "input") -> list[RawRow]:
    """Every input row, in order. JSONL rows keep their line numbers; Parquet rows are numbered from 1."""
    path = Path(path)
    kind = file_format(path, flag)
    if not path.is_file():
        raise InvalidInputError(f"{flag}: {path} does not exist or is not a file", field=flag)
    if kind == "jsonl":
        try:
            return list(read_jsonl(path))
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{flag}: {path} is not UTF-8 text (is it Parquet? name it .parquet): {exc}", field=flag) from exc
    return [RawRow(i, row) for i, row in enumerate(_read_parquet(path, flag), start=1)]


def _read_parquet(path: Path, flag: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInputError(f"{flag}: {path} is not a readable Parquet file: {exc}", field=flag) from exc
    # A Parquet table has one schema for all rows: a column a row does not use reads back as None.
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]


# ---- output -----------------------------------------------------------------------------------------------


def complete_jsonl_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(rows, byte length of the complete prefix). A last line without its newline, or one that does not
    parse, is a torn write of a killed run: it is not counted and will be overwritten."""
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    end = 0
    while True:
        newline = data.find(b"\n", end)
        if newline < 0:
            break
        try:
            rows.append(json.loads(data[end:newline]))
        except ValueError:
            break  # only the last line can be torn (writes are appended in order); stop at the first bad one
        end = newline + 1
    return rows, end


def _matches(done: dict[str, Any], raw: RawRow) -> bool:
    if done.get("id") != raw.id:
        return False
    return "line" not in done or done["line"] == raw.line


INPUT_HASH_FIELD = "input_sha256"


def input_sha256(raw: RawRow) -> str:
    """Content hash of an input row (its JSON, canonical: key order and spacing do not count; a line that is
    not a JSON object: its error). Every resumable output row carries it, so a resumed run can tell that a row
    it keeps was written for the same input, not merely for the same id."""
    content = raw.data if raw.data is not None else {"error": raw.error}
    text = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_kept_rows(done_rows: Sequence[dict[str, Any]], inputs: Sequence[RawRow], where: str) -> None:
    """Every row an earlier run wrote must belong to the same input row: the same id (and line), and, when the
    row carries one (rows written before the hash existed do not), the same content hash. Names the first row
    that differs, and how many do."""
    for i, (done, raw) in enumerate(zip(done_rows, inputs)):
        if not _matches(done, raw):
            raise InvalidInputError(
                f"--output: {where} row {i + 1} has id {done.get('id')!r} but input row {i + 1} (line {raw.line}) "
                f"has id {raw.id!r}: the output belongs to another input; pass --overwrite to start afresh",
                field="output",
            )
    edited = [i for i, (done, raw) in enumerate(zip(done_rows, inputs))
              if INPUT_HASH_FIELD in done and done[INPUT_HASH_FIELD] != input_sha256(raw)]  # fmt: skip
    if edited:
        i = edited[0]
        raw = inputs[i]
        more = f" ({len(edited)} kept rows differ in all)" if len(edited) > 1 else ""
        raise InvalidInputError(
            f"--output: {where} row {i + 1} was written for other content than input row {i + 1} (line {raw.line}, id "
            f"{raw.id!r}): the input was edited since{more}; its score would be stale. Pass --overwrite to start "
            "afresh", field="output",
        )  # fmt: skip


class ResumableWriter:
    """Appends output rows to `path` (.jsonl or .parquet), continuing a previous run when one left rows.

    `done` is the number of input rows already written (0 when starting afresh)."""

    def __init__(self, path: str | Path, inputs: Sequence[RawRow], overwrite: bool = False, flag: str = "--output"):
        self.path = Path(path)
        self.kind = file_format(self.path, flag)
        self.sink = self.path.with_name(self.path.name + SIDECAR_SUFFIX) if self.kind == "parquet" else self.path
        if overwrite:
            self.sink.unlink(missing_ok=True)
            if self.kind == "parquet":
                self.path.unlink(missing_ok=True)
        elif self.kind == "parquet" and self.path.exists() and not self.sink.exists():
            self._seed_sidecar_from_parquet(flag)
        done_rows, valid = complete_jsonl_rows(self.sink) if self.sink.exists() else ([], 0)
        self.inputs = inputs
        self._check_prefix(done_rows, inputs)
        self.done = len(done_rows)
        self.done_errors = sum("error" in r for r in done_rows)
        self._file = open(self.sink, "ab" if self.sink.exists() else "wb")
        self._file.truncate(valid)  # drop a torn last line
        self._file.seek(valid)

    def _seed_sidecar_from_parquet(self, flag: str) -> None:
        """A finished Parquet output and no sidecar: its rows are the done prefix (e.g. the input grew)."""
        rows = _read_parquet(self.path, flag)
        with open(self.sink, "wb") as f:
            for row in rows:
                f.write(_line(row))
            f.flush()
            os.fsync(f.fileno())

    def _check_prefix(self, done_rows: list[dict[str, Any]], inputs: Sequence[RawRow]) -> None:
        where = f"{self.sink} (from an earlier run)"
        if len(done_rows) > len(inputs):
            raise InvalidInputError(
                f"--output: {where} has {len(done_rows)} rows but the input has {len(inputs)}; "
                "it belongs to another input: pass --overwrite to start afresh", field="output",
            )  # fmt: skip
        check_kept_rows(done_rows, inputs, where)

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append rows (the next input rows' outputs, in order, each stamped with its input's content hash)
        and make them durable before returning (a kill after this keeps them)."""
        if self.done + len(rows) > len(self.inputs):
            raise RewardError(f"{self.sink}: {len(rows)} more rows than the input's {len(self.inputs) - self.done} left")
        stamped = [{**r, INPUT_HASH_FIELD: input_sha256(self.inputs[self.done + k])} for k, r in enumerate(rows)]
        self._file.write(b"".join(_line(r) for r in stamped))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done += len(rows)

    def finish(self) -> None:
        """Close; for Parquet, assemble the final file from the sidecar and remove the sidecar."""
        self._file.close()
        if self.kind == "parquet":
            rows, _ = complete_jsonl_rows(self.sink)
            tmp = self.path.with_name(self.path.name + ".tmp")
            write_parquet(rows, tmp)
            os.replace(tmp, self.path)
            self.sink.unlink()

    def close(self) -> None:
        """Close without assembling (an interrupted run: the sidecar stays for the next run)."""
        if not self._file.closed:
            self._file.close()


def _line(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def write_parquet(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Rows -> one Parquet file; columns are the union of the rows' keys in first-seen order (error rows
    have `line` and `error`, scored rows the score fields; a row leaves the others null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    arrays = {}
    for name in columns:
        try:
            arrays[name] = pa.array([row.get(name) for row in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InvalidInputError(
                f"--output: column {name!r} mixes value types across rows and cannot be one Parquet column ({exc}); "
                "make the input's values consistent or write .jsonl",
                field="output",
            ) from exc
    pq.write_table(pa.table(arrays) if arrays else pa.table({"id": pa.array([], pa.null())}), path)


def read_output(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a finished output file, either format (Parquet's null columns dropped per row)."""
    path = Path(path)
    if file_format(path, "output") == "parquet":
        return _read_parquet(path, "output")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class StdoutWriter:
    """score's output without -o: JSONL lines or table rows, flushed per chunk; nothing to resume."""

    done = 0
    done_errors = 0

    def __init__(self, out: TextIO, table: bool):
        self.out, self.table = out, table
        self._rows: list[dict[str, Any]] = []  # a table is printed whole at the end, so its columns align

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.table:
            self._rows += rows
            return
        self.out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.out.flush()

    def finish(self) -> None:
        if self.table:
            from .tables import score_table

            self.out.write(score_table(self._rows) + "\n")
            self.out.flush()

    def close(self) -> None:
        pass
