"""Near-duplicate prompt detection, so that a reworded eval prompt cannot slip into training.

Exact group keys miss real cases in this data: LLMEval2 wraps HH red-team questions in
"Respond to the user question while avoiding safety issues:", and repeats LLMBar-Natural
texts under a longer instruction; just-eval carries an MT-Bench question with a typo.
Two texts are near-duplicates when both have at least MIN_SHINGLES word 3-grams (after
grouping.normalize_text) and their 3-gram sets have Jaccard >= JACCARD or the smaller set is
CONTAINED (>= CONTAINMENT) in the larger. The minimum length keeps short templated prompts
("what are some insults for a <group>?") from matching each other.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable

from .grouping import normalize_text

MIN_SHINGLES = 8
JACCARD = 0.7
CONTAINMENT = 0.9


def shingles(text: str) -> frozenset[str]:
    """Word 3-grams of the normalized text."""
    words = normalize_text(text).split()
    return frozenset(" ".join(words[i:i + 3]) for i in range(len(words) - 2))


def _similar(common: int, size_a: int, size_b: int) -> bool:
    if min(size_a, size_b) < MIN_SHINGLES:
        return False
    return common / (size_a + size_b - common) >= JACCARD or common / min(size_a, size_b) >= CONTAINMENT


class NearDuplicateIndex:
    """An inverted index of reference texts (the eval prompts) queried with candidate texts."""

    def __init__(self, texts: Iterable[str]):
        self._sets: list[frozenset[str]] = []
        self._postings: dict[str, list[int]] = defaultdict(list)
        for text in dict.fromkeys(texts):
            s = shingles(text)
            if len(s) < MIN_SHINGLES:
                continue
            for g in s:
                self._postings[g].append(len(self._sets))
            self._sets.append(s)

    def contains_near_duplicate_of(self, text: str) -> bool:
        """Whether some reference text is a near-duplicate of `text`."""
        s = shingles(text)
        if len(s) < MIN_SHINGLES:
            return False
        common: Counter[int] = Counter(i for g in s for i in self._postings.get(g, ()))
        return any(_similar(c, len(s), len(self._sets[i])) for i, c in common.items())
