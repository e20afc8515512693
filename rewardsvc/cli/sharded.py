"""Sharded batch scoring under torchrun: `torchrun --nproc-per-node N -m rewardsvc score IN -o OUT` (several nodes
through torchrun's rendezvous, with OUT on a filesystem every node sees).

Each of the N ranks scores its shard of the input on its own device (cuda:LOCAL_RANK when --device is auto and a
GPU is present) with the ordinary resumable pipeline (`score_pipeline.score_rows`) into its own part file
`OUT.part-R-of-N.jsonl`. When every rank is done (a gloo barrier), rank 0 merges the parts in input order into OUT
(written to a temporary file and renamed: OUT is absent or complete) and removes them.

Shards are contiguous blocks of rows (so each part is a run of the input); with --group-by each group goes wholly
to one rank (group statistics need every member), groups dealt to the least-loaded rank in order of first
appearance. Resuming: re-run the same command with the same N; each rank continues its part after its last
complete row. A finished OUT is left alone (the run reports it complete)."""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, RewardError
from .batch_io import RawRow

# A shard of a large input can take hours; the barrier waits for the slowest rank, not for 30 minutes.
BARRIER_TIMEOUT = datetime.timedelta(hours=72)


@dataclass(frozen=True)
class TorchrunJob:
    """This process's place in a torchrun job: its rank among `size` processes, and on its node."""

    rank: int
    size: int
    local_rank: int


def torchrun_job() -> TorchrunJob:
    """From torchrun's environment (size 1 outside torchrun)."""

    def env_int(name: str, default: int) -> int:
        raw = os.environ.get(name)
        try:
            return default if raw is None else int(raw)
        except ValueError:
            raise InvalidInputError(f"${name}={raw!r} is not an integer (set by torchrun)", field=name) from None

    job = TorchrunJob(env_int("RANK", 0), env_int("WORLD_SIZE", 1), env_int("LOCAL_RANK", 0))
    if job.size < 1 or not 0 <= job.rank < job.size:
        raise InvalidInputError(f"$RANK={job.rank} is not in [0, $WORLD_SIZE={job.size})", field="RANK")
    return job


def part_path(output: str | Path, rank: int, size: int) -> Path:
    output = Path(output)
    return output.with_name(f"{output.name}.part-{rank:05d}-of-{size:05d}.jsonl")


def plan_shards(inputs: Sequence[RawRow], size: int, group_by: str | None = None) -> list[list[int]]:
    """Input row indices per rank, each list ascending. Without group_by: contiguous, near-equal blocks."""
    n = len(inputs)
    if group_by is None:
        return [list(range(r * n // size, (r + 1) * n // size)) for r in range(size)]
    groups: dict[str, list[int]] = {}
    for i, raw in enumerate(inputs):
        data = raw.data if raw.error is None else None
        # rows without the field (error rows) form singleton "groups" of their own
        key = json.dumps(data[group_by], sort_keys=True) if data and group_by in data else f"\0row{i}"
        groups.setdefault(key, []).append(i)
    shards: list[list[int]] = [[] for _ in range(size)]
    for members in groups.values():
        min(shards, key=len).extend(members)  # least-loaded rank; ties to the lowest rank
    return [sorted(s) for s in shards]


def merge_parts(output: str | Path, shards: list[list[int]], total: int) -> None:
    """Rank 0: the parts' rows put back at their input positions, written to OUT atomically; parts removed."""
    from .batch_io import complete_jsonl_rows, file_format, write_parquet

    output = Path(output)
    merged: list[Any] = [None] * total
    for rank, indices in enumerate(shards):
        rows, _ = complete_jsonl_rows(part_path(output, rank, len(shards)))
        if len(rows) != len(indices):
            raise RewardError(f"{part_path(output, rank, len(shards))} has {len(rows)} rows, its shard {len(indices)}")
        for i, row in zip(indices, rows):
            merged[i] = row
    tmp = output.with_name(output.name + ".merge.tmp")
    if file_format(output, "--output") == "parquet":
        write_parquet(merged, tmp)
    else:
        with open(tmp, "wb") as f:
            f.write(b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in merged))
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, output)
    for rank in range(len(shards)):
        part_path(output, rank, len(shards)).unlink()


def _finished(output: Path, inputs: Sequence[RawRow], overwrite: bool) -> bool:
    """True when OUT exists and already holds every input row (a completed run). An OUT holding other rows, or
    only some (a run without torchrun), is an error: this run cannot continue it."""
    from .batch_io import check_kept_rows, complete_jsonl_rows, file_format, read_output

    if overwrite or not output.exists():
        return False
    rows = complete_jsonl_rows(output)[0] if file_format(output, "--output") == "jsonl" else read_output(output)
    if [r.get("id") for r in rows] == [raw.id for raw in inputs]:
        check_kept_rows(rows, inputs, f"{output} (a finished run)")  # an edited input row is not "complete"
        return True
    raise InvalidInputError(
        f"--output: {output} exists with {len(rows)} rows that are not this input's {len(inputs)} rows (another input, "
        "or a run without torchrun that has not finished); finish that run, or pass --overwrite to start afresh",
        field="output",
    )


def run_sharded(args, inputs: list[RawRow], weights, job: TorchrunJob) -> int:
    """The score command's body on one rank of a torchrun job. Every rank returns the same exit code."""
    import torch
    import torch.distributed as dist

    from .score_sources import open_score_source
    from .score_pipeline import score_rows
    from .main import parse_normalization

    if args.output is None:
        raise InvalidInputError("-o/--output is required under torchrun: each rank writes a part file next to it",
                                field="output")  # fmt: skip
    if args.device == "auto" and getattr(args, "device_map", None) is None and torch.cuda.is_available():
        args.device = f"cuda:{job.local_rank % torch.cuda.device_count()}"  # one GPU per rank
    output = Path(args.output)
    shards = plan_shards(inputs, job.size, args.group_by)
    mine = [inputs[i] for i in shards[job.rank]]
    # gloo: the job only synchronizes (a barrier and a few small objects), on any device.
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        outcome: dict[str, Any] = {"rank": job.rank, "errors": 0, "failure": None, "line": ""}
        try:
            finished = _finished(output, inputs, args.overwrite)
            if not finished:
                if args.overwrite and job.rank == 0:
                    output.unlink(missing_ok=True)
                source, description = open_score_source(args, weights, parse_normalization(args))
                try:
                    summary = score_rows(mine, part_path(output, job.rank, job.size), source, chunk_size=args.chunk_size,
                                         group_by=args.group_by, overwrite=args.overwrite, progress=False)  # fmt: skip
                finally:
                    source.close()
                summary.source = f"{description} on {args.device}"
                outcome.update(errors=summary.errors, line=f"rank {job.rank}/{job.size}: {summary.line()}")
            else:
                outcome["line"] = f"rank {job.rank}/{job.size}: {output} is already complete ({len(inputs)} rows)"
        except RewardError as exc:
            outcome["failure"] = str(exc)
        outcomes: list[Any] = [None] * job.size
        dist.all_gather_object(outcomes, outcome)  # also the barrier: every part is complete after it
        print(outcome["line"] or f"rank {job.rank}/{job.size}: error: {outcome['failure']}", file=sys.stderr)
        failures = [o for o in outcomes if o["failure"]]
        if failures:
            if job.rank == 0:
                for o in failures:
                    print(f"error: rank {o['rank']}: {o['failure']} (parts kept; re-run to resume)", file=sys.stderr)
            return 2
        merge_failure = None
        if job.rank == 0 and not finished:
            try:
                merge_parts(output, shards, len(inputs))
                print(f"score: merged {job.size} parts into {output} ({len(inputs)} rows, input order)", file=sys.stderr)
            except (RewardError, OSError) as exc:  # still reach the barrier below, so no rank waits for us
                merge_failure = exc
        dist.barrier()  # nobody exits (and so no launcher tears the job down) before the merge is done
        if merge_failure is not None:
            print(f"error: merging the parts into {output}: {merge_failure} (parts kept)", file=sys.stderr)
            return 2
        errors = sum(o["errors"] for o in outcomes)
        return 1 if errors else 0
    finally:
        dist.destroy_process_group()
