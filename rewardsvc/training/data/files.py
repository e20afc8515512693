"""Where the staged data lives and how its files are read (.gz transparently).

The data is not committed: code takes the directory as an argument, defaulting to the
`REWARDSVC_DATA_DIR` environment variable, else `<repo>/../shared/data`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

DATA_DIR_ENV = "REWARDSVC_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[3]


def default_data_dir() -> Path:
    """The data directory: `$REWARDSVC_DATA_DIR` if set, else `<repo>/../shared/data`."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    return _REPO_ROOT.parent / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """`data_dir` as a Path, or the default; raises FileNotFoundError naming the env var if absent."""
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {path} does not exist; pass data_dir or set {DATA_DIR_ENV}"
        )
    return path


def open_text(path: Path) -> io.TextIOBase:
    """Open a UTF-8 text file, gunzipping when the name ends in `.gz`."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_json(path: Path) -> Any:
    """Parse one JSON document (plain or .gz)."""
    with open_text(path) as f:
        return json.load(f)


def read_jsonl(path: Path) -> Iterator[dict]:
    """Yield the objects of a JSON-lines file (plain or .gz), skipping blank lines."""
    with open_text(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file with a header (plain or .gz); multi-line quoted fields are kept intact."""
    with open_text(path) as f:
        return list(csv.DictReader(f))
