"""How conversations are grouped into forward passes.

- `plan_padded_batches`: length-sorted padded batches under a token budget (the default on every device).
- `plan_shared_prompts`: conversations whose token lists start with the same prompt (a GRPO / RLOO group,
  the two sides of a Compare pair) run that prompt once and continue from its key/value cache.
- `plan_packed_batches`: padding-free batches (rows concatenated into one sequence, a block-diagonal mask).

Functions of lengths and token prefixes only, so that another policy can slot in behind the same signatures.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_padded_batches(lengths: list[int], token_budget: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, so that rows x longest row <= token_budget.

    Sorting by length keeps padding small; a row longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > token_budget or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def plan_packed_batches(lengths: list[int], token_budget: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped so that the *sum* of lengths (no padding) stays <= token_budget, longest first.
    A row longer than the budget gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        if current and (total + lengths[i] > token_budget or len(current) >= max_batch_size):
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        batches.append(current)
    return batches


def plan_shared_prompts(prefixes: Sequence[tuple[int, ...]], min_group: int = 2) -> tuple[list[list[int]], list[int]]:
    """(groups, rest): indices whose prompt token prefixes are identical, in groups of at least `min_group`
    (first-seen order), and the remaining indices (scored the flat way).

    The prefix is taken from each *whole* conversation's tokens, so equal prefixes mean the prompt's key/value
    cache is exactly what the whole conversation computes there (causal attention); a response whose
    tokenization merged with the prompt's last token has a different prefix and falls back to the flat path.
    """
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for i, prefix in enumerate(prefixes):
        by_prefix.setdefault(tuple(prefix), []).append(i)
    groups = [members for members in by_prefix.values() if len(members) >= min_group]
    grouped = {i for g in groups for i in g}
    return groups, [i for i in range(len(prefixes)) if i not in grouped]
