"""Dataset adapters, the fixed splits, and the assembled training / eval sets.

    from rewardsvc.training.data import build_training_sets, print_summary
    sets = build_training_sets()            # data dir: $REWARDSVC_DATA_DIR or <repo>/../shared/data
    sets.write("artifacts/data")            # stage1.jsonl, stage2.jsonl, eval.jsonl
    print_summary(sets)

One module per dataset (just_eval, prometheus, xstest, ultrafeedback, hh_harmless, pandalm,
llmbar, arena_bench); schema.py holds the two row types; splits.py the split rules; build.py the budgeted
assembly. See docs/DATA.md.
"""

from .attributes import ATTRIBUTE_NAMES, ATTRIBUTES, VERBOSITY, AttributeSpec
from .build import (DEFAULT_CAPS, DEFAULT_EVAL_MAX_CHARS, DEFAULT_MAX_CHARS, TrainingSets, build_training_sets,
                    write_jsonl)
from .files import DATA_DIR_ENV, default_data_dir
from .schema import PreferencePair, RatedConversation
from .sources import load_preference_pairs, load_rated_conversations
from .summary import format_summary, print_summary, summarize

__all__ = [
    "ATTRIBUTES", "ATTRIBUTE_NAMES", "VERBOSITY", "AttributeSpec",
    "DEFAULT_CAPS", "DEFAULT_EVAL_MAX_CHARS", "DEFAULT_MAX_CHARS", "TrainingSets", "build_training_sets", "write_jsonl",
    "DATA_DIR_ENV", "default_data_dir",
    "PreferencePair", "RatedConversation",
    "load_preference_pairs", "load_rated_conversations",
    "format_summary", "print_summary", "summarize",
]
