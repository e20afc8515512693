"""Prometheus-Eval benchmark files (Apache-2.0): rubric-scored responses and HHH pairs.

- `prometheus-mt-bench` / `prometheus-vicuna` (stage 1): 320 + 320 responses, each with three
  GPT-4 rubric scores (1-5); `prometheus_score` is their mean. MT-Bench items are second turns:
  the two-turn dialogue embedded in the grading prompt is parsed back into messages.
- `prometheus-hhh` (pairs): the 221 BIG-bench HHH-alignment pairs, categories harmless /
  honest / helpful / other. Prompts may be multi-turn ("...\n\nAssistant: ...\n\nHuman: ...").
Prompt and response are cut out of the Prometheus grading prompt (see SOURCE.md).
"""

from __future__ import annotations

import re
from collections import Counter

from ...errors import InvalidInputError
from .attributes import make_labels
from .files import read_json, resolve_data_dir
from .grouping import group_key
from .schema import PreferencePair, RatedConversation
from .transcript import parse_transcript

DIR = "prometheus-eval-benchmarks"
RATED_FILES = (("prometheus-mt-bench", "mt_bench_eval.json"), ("prometheus-vicuna", "vicuna_eval.json"))
HHH_FILE = "hhh_alignment_eval.json"
HHH_SUBSET_CATEGORY = {
    "harmless": ("hhh-harmless", "safety"),
    "honest": ("hhh-honest", "honesty"),
    "helpful": ("hhh-helpful", "helpfulness"),
    "other": ("hhh-other", "helpfulness"),
}

_INSTRUCTION = "###The instruction to evaluate:\n"
_RESPONSE = "###Response to evaluate:\n"
_RESPONSE_END = re.compile(r"\n\n###(?:Reference Answer|Score Rubrics)")
_MT_BENCH_HEAD = (
    "Here is a previous dialogue between an assistant and an user. "
    "Generate a human preferable response by the assistant.\n"
)
_DIALOGUE_TURN = re.compile(r"(?:^|\n\n)(User|Assistant):")


def extract_instruction_and_response(grading_prompt: str) -> tuple[str, str]:
    """(instruction, response) cut out of a Prometheus grading prompt, both stripped."""
    try:
        head, rest = grading_prompt.split(_INSTRUCTION, 1)[1].split("\n\n" + _RESPONSE, 1)
    except (IndexError, ValueError):
        raise InvalidInputError("not a Prometheus grading prompt (markers missing)") from None
    end = _RESPONSE_END.search(rest)
    if end is None:
        raise InvalidInputError("Prometheus grading prompt: no end marker after the response")
    return head.strip(), rest[: end.start()].strip()


def instruction_to_prompt(instruction: str) -> list[dict]:
    """Messages of an instruction: an MT-Bench dialogue ("User: ...\n\nAssistant: ...\n\nUser: ...
    \n\nAssistant:"), an HH-style multi-turn prompt, or a plain single user turn."""
    if instruction.startswith(_MT_BENCH_HEAD):
        parts = _DIALOGUE_TURN.split(instruction[len(_MT_BENCH_HEAD):])
        turns = [{"role": "user" if parts[i] == "User" else "assistant", "content": parts[i + 1].strip()}
                 for i in range(1, len(parts), 2)]
        if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns.pop()  # the empty "Assistant:" slot the graded response fills
        return turns
    return parse_transcript("\n\nHuman: " + instruction)


def load_rated(data_dir=None, dropped: Counter | None = None) -> list[RatedConversation]:
    """MT-Bench and Vicuna-Bench responses with `prometheus_score` = mean of the 3 GPT-4 scores."""
    root = resolve_data_dir(data_dir) / DIR
    out = []
    for source, filename in RATED_FILES:
        for row in read_json(root / filename):
            instruction, response = extract_instruction_and_response(row["instruction"])
            prompt = instruction_to_prompt(instruction)
            scores = row["gpt4_score"]
            if isinstance(scores, str):
                scores = [float(s) for s in scores.strip("[]").split(",")]
            messages = prompt + [{"role": "assistant", "content": response}]
            out.append(RatedConversation(
                id=f"{source}/{row['idx']}/{row['response_source']}", source=source, messages=messages,
                labels=make_labels(response, prometheus_score=sum(scores) / len(scores)), group=group_key(prompt),
            ))
    return out


def load_pairs(data_dir=None, dropped: Counter | None = None) -> list[PreferencePair]:
    """The 221 HHH-alignment pairs (source `prometheus-hhh`), subset `hhh-<category>`."""
    root = resolve_data_dir(data_dir) / DIR
    out = []
    for i, row in enumerate(read_json(root / HHH_FILE)):
        instruction, chosen = extract_instruction_and_response(row["chosen_instruction"])
        instruction_r, rejected = extract_instruction_and_response(row["rejected_instruction"])
        if instruction != instruction_r:
            raise InvalidInputError(f"prometheus-hhh row {i}: chosen and rejected prompts differ")
        prompt = instruction_to_prompt(instruction)
        subset, category = HHH_SUBSET_CATEGORY[row["source"]]
        out.append(PreferencePair(
            id=f"prometheus-hhh/{i:03d}", source="prometheus-hhh", prompt=prompt, chosen=chosen,
            rejected=rejected, subset=subset, category=category, group=group_key(prompt),
        ))
    return out
