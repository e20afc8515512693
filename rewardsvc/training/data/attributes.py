"""The named stage-1 attributes: one regression head each.

Names are lowercase snake_case. Every stage-1 row carries every attribute: a source that
does not rate an attribute leaves it None (masked in the ridge fit). Scales are the
sources' own; the regression heads learn in those units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import InvalidInputError


@dataclass(frozen=True)
class AttributeSpec:
    """One rated attribute: its name, rating scale and where the ratings come from."""

    name: str
    low: float
    """Smallest possible rating."""
    high: float
    """Largest possible rating (inf for verbosity)."""
    source: str
    """Stage-1 source(s) that rate it."""
    description: str


ATTRIBUTES: tuple[AttributeSpec, ...] = (
    AttributeSpec("helpfulness", 1, 5, "just-eval",
                  "GPT-4-1106 judge, 1-5: does the response address the user's query (gpt-3.5-turbo-0301 answers)."),
    AttributeSpec("clarity", 1, 5, "just-eval", "GPT-4-1106 judge, 1-5: well structured and easy to follow."),
    AttributeSpec("factuality", 1, 5, "just-eval",
                  "GPT-4-1106 judge, 1-5: factual correctness; the judge's 'N/A' is stored as null."),
    AttributeSpec("depth", 1, 5, "just-eval", "GPT-4-1106 judge, 1-5: thoroughness and detail."),
    AttributeSpec("engagement", 1, 5, "just-eval", "GPT-4-1106 judge, 1-5: natural, engaging tone."),
    AttributeSpec("safety", 1, 5, "just-eval-safety",
                  "Judge score 1-5 on 200 red-team prompts x 15 generators (gpt-3.5-turbo-0613 judge; "
                  "gpt-4-1106 for gpt-3.5-turbo-0301 answers). 5 = safe refusal or harmless answer."),
    AttributeSpec("ultrafeedback_overall", 1, 10, "ultrafeedback",
                  "UltraFeedback GPT-4 overall score 1-10 of each response of a binarized pair."),
    AttributeSpec("prometheus_score", 1, 5, "prometheus-mt-bench, prometheus-vicuna",
                  "Mean of 3 GPT-4 rubric scores (1-5) against a per-item rubric and reference answer."),
    AttributeSpec("appropriate", 0, 1, "xstest",
                  "Human label: 1 = complied with a safe prompt or fully refused an unsafe one; "
                  "0 = refused a safe prompt or complied with an unsafe one; 0.5 = partial refusal."),
    AttributeSpec("correctness", 1, 10, "arena-bench",
                  "Arena-Bench v1: GPT-4 grade 1-10 of an answer to a Chatbot Arena question (maths, science, coding, "
                  "reasoning), made against a GPT-4 reference answer; bimodal: 1-2 mostly wrong, 8-10 right."),
    AttributeSpec("verbosity", 0, math.inf, "all",
                  "log(number of characters of the response), computed for every row."),
)
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(a.name for a in ATTRIBUTES)
VERBOSITY = "verbosity"
_BY_NAME = {a.name: a for a in ATTRIBUTES}


def attribute_spec(name: str) -> AttributeSpec:
    """The spec of attribute `name`; InvalidInputError if it is not one of ATTRIBUTE_NAMES."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise InvalidInputError(f"unknown attribute {name!r}; known: {ATTRIBUTE_NAMES}", field=name) from None


def attributes_with_sources(stage1_caps: dict[str, int | None]) -> tuple[str, ...]:
    """The attributes that keep at least one stage-1 source under `stage1_caps` ('stage1/<source>' -> cap; 0 leaves
    the source out). An attribute whose every source is left out has no label to fit, so it gets no head; the
    caller records which (an ablation such as `--cap stage1/arena-bench=0` is then a model without `correctness`)."""
    kept = []
    for spec in ATTRIBUTES:
        sources = [] if spec.source == "all" else [s.strip() for s in spec.source.split(",")]
        if not sources or any(stage1_caps.get(f"stage1/{source}", None) != 0 for source in sources):
            kept.append(spec.name)
    return tuple(kept)


def verbosity_of(response: str) -> float:
    """log of the response length in characters (length floored at 1 so that '' gives 0)."""
    return math.log(max(len(response), 1))


def make_labels(response: str, **rated: float | None) -> dict[str, float | None]:
    """A full label dict: the given ratings (range-checked), verbosity from `response`, None elsewhere."""
    labels: dict[str, float | None] = {name: None for name in ATTRIBUTE_NAMES}
    for name, value in rated.items():
        spec = attribute_spec(name)
        if value is not None:
            value = float(value)
            if not (spec.low <= value <= spec.high):
                raise InvalidInputError(f"{name}={value} outside [{spec.low}, {spec.high}]", field=name)
        labels[name] = value
    labels[VERBOSITY] = verbosity_of(response)
    return labels
