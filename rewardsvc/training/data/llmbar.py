"""LLMBar (princeton-nlp, MIT; Processed/ sets keep their upstream terms): pairwise sets.

Every file is a JSON array of {input, output_1, output_2, label}; label (1 or 2) names the
better output. The five LLMBar sets are the 419 pairs RewardBench uses for chat-hard (its
subset names are kept); the Processed sets are human-judged pairs from other benchmarks.
Dropped: one LLMEval2 row with two identical outputs and one whose rejected output is
only whitespace.
"""

from __future__ import annotations

from collections import Counter

from ...errors import InvalidInputError
from .files import read_json, resolve_data_dir
from .grouping import group_key
from .schema import PreferencePair

# (path under llmbar/, source, subset, category)
SETS = (
    ("LLMBar/Natural/dataset.json", "llmbar", "llmbar-natural", "chat-hard"),
    ("LLMBar/Adversarial/Neighbor/dataset.json", "llmbar", "llmbar-adver-neighbor", "chat-hard"),
    ("LLMBar/Adversarial/GPTInst/dataset.json", "llmbar", "llmbar-adver-GPTInst", "chat-hard"),
    ("LLMBar/Adversarial/GPTOut/dataset.json", "llmbar", "llmbar-adver-GPTOut", "chat-hard"),
    ("LLMBar/Adversarial/Manual/dataset.json", "llmbar", "llmbar-adver-manual", "chat-hard"),
    ("Processed/MT-Bench/dataset.json", "mt-bench-human", "mt-bench-human", "chat"),
    ("Processed/FairEval/dataset.json", "faireval", "faireval", "chat"),
    ("Processed/LLMEval2/dataset.json", "llmeval2", "llmeval2", "chat"),
)


def load_pairs(data_dir=None, dropped: Counter | None = None) -> list[PreferencePair]:
    """All eight sets; ids `<subset>/<row index>`."""
    dropped = dropped if dropped is not None else Counter()
    root = resolve_data_dir(data_dir) / "llmbar"
    out = []
    for rel, source, subset, category in SETS:
        for i, row in enumerate(read_json(root / rel)):
            if row["label"] not in (1, 2):
                raise InvalidInputError(f"llmbar/{rel} row {i}: label {row['label']!r} is not 1 or 2", field="label")
            chosen, rejected = row[f"output_{row['label']}"], row[f"output_{3 - row['label']}"]
            if chosen.strip() == rejected.strip():
                dropped[f"{subset}: identical outputs"] += 1
                continue
            if not chosen.strip() or not rejected.strip():
                dropped[f"{subset}: empty (whitespace-only) output"] += 1
                continue
            prompt = [{"role": "user", "content": row["input"]}]
            out.append(PreferencePair(
                id=f"{subset}/{i:03d}", source=source, prompt=prompt, chosen=chosen, rejected=rejected,
                subset=subset, category=category, group=group_key(prompt),
            ))
    return out
