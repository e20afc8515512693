"""Hugging Face hub ids (`owner/name` or `owner/name@revision`) -> a local directory, from the local Hugging
Face cache only.

`--model RLHFlow/ArmoRM-Llama3-8B-v0.1` is what users type. The service never downloads at load time (a
server must start the same way every time, and HF_HUB_OFFLINE must hold), so an id is looked up in the
cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub) and a missing one is a clear error
that says where it looked and the command that fetches it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

# owner/name[@revision]: the hub's own name rules (letters, digits, '-', '_', '.'), one slash.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<revision>[\w.\-/]+))?$")


def looks_like_hub_id(reference: str) -> bool:
    """True for `owner/name[@revision]` that is not an existing local path (a local directory always wins)."""
    return bool(HUB_ID.match(reference)) and not Path(reference).exists() and not reference.startswith((".", "/"))


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps its cache, read from the environment now (not when it was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home) / "hub"


def resolve_hub_id(reference: str, flag: str = "--model") -> Path:
    """The local snapshot directory of `owner/name[@revision]` (default revision: main), from the cache only.

    Raises CheckpointError naming `flag`, the cache directory and the download command when it is not cached."""
    match = HUB_ID.match(reference)
    if match is None:
        raise CheckpointError(f"{flag}: {reference!r} is not a hub id (owner/name or owner/name@revision)")
    repo, revision = match["repo"], match["revision"]
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        # local_files_only: never a network call, whatever HF_HUB_OFFLINE says.
        return Path(snapshot_download(repo, revision=revision, cache_dir=str(cache), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        raise CheckpointError(
            f"{flag}: {reference} is neither a local directory nor in the local Hugging Face cache {cache} "
            f"(revision {revision or 'main'}); the service never downloads: fetch it first with `{fetch}` "
            f"(HF_HUB_CACHE / HF_HOME choose the cache)"
        ) from exc


def resolve_model_path(reference: str | Path, flag: str = "--model") -> Path:
    """A local path as given, or the cached snapshot of a hub id."""
    text = str(reference)
    return resolve_hub_id(text, flag) if looks_like_hub_id(text) else Path(reference)
