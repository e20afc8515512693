"""Every dataset adapter, in one place: load all stage-1 rows or all preference pairs."""

from __future__ import annotations

from collections import Counter

from . import arena_bench, hh_harmless, just_eval, llmbar, pandalm, prometheus, ultrafeedback, xstest
from .schema import PreferencePair, RatedConversation

RATED_LOADERS = (just_eval.load_rated, prometheus.load_rated, xstest.load_rated, ultrafeedback.load_rated,
                 arena_bench.load_rated)
PAIR_LOADERS = (ultrafeedback.load_pairs, hh_harmless.load_pairs, pandalm.load_pairs, llmbar.load_pairs,
                prometheus.load_pairs, xstest.load_pairs, arena_bench.load_pairs)
RATED_SOURCES = ("just-eval", "just-eval-safety", "prometheus-mt-bench", "prometheus-vicuna", "xstest", "ultrafeedback",
                 "arena-bench")
PAIR_SOURCES = ("ultrafeedback", "hh-harmless", "pandalm", "llmbar", "mt-bench-human", "faireval", "llmeval2",
                "prometheus-hhh", "xstest", "arena-bench")


def load_rated_conversations(data_dir=None, dropped: Counter | None = None) -> list[RatedConversation]:
    """Every stage-1 rated conversation of every source, before any split or filter."""
    return [row for load in RATED_LOADERS for row in load(data_dir, dropped)]


def load_preference_pairs(data_dir=None, dropped: Counter | None = None) -> list[PreferencePair]:
    """Every preference pair of every source, before any split or filter."""
    return [pair for load in PAIR_LOADERS for pair in load(data_dir, dropped)]
