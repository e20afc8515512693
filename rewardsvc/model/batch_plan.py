"""How conversations are grouped into forward passes (padded, length-sorted, under a token budget).

One function so that another policy (packed, padding-free) can slot in behind the same signature.
"""

from __future__ import annotations


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
