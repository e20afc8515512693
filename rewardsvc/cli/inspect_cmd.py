"""`rewardsvc inspect PROMPT`: the attribute weights the gating chooses for a prompt, as a table sorted by
weight (or `--json`), optionally a bar chart (`--plot FILE.png`); locally or through `--server`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ..errors import InvalidInputError

uses_model = True

INPUT_FORMAT = """\
PROMPT: a plain string (one user turn), or a JSON list of messages ending with a user message:
  '[{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]'
output: a table (attribute, gating weight, effective coefficient), largest weight first;
  --json prints {"model_id", "weights_source", "num_tokens", "gating", "coefficients", "has_gating"} instead.
  A model without gating (a sequence-classification model) says so: its weights never depend on the prompt
  (gating is empty; coefficients are its fixed label mix, empty for a single-score model)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .score_sources import add_server_arguments

    parser.add_argument("prompt", help="a prompt string, or a JSON list of messages ending with a user message")
    parser.add_argument("--weights", help="optional steering, as for score")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the gating weights as a bar chart (PNG)")
    add_server_arguments(parser)


def plot_weights(gating: dict[str, float], coefficients: dict[str, float], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    names = sorted(gating, key=lambda n: gating[n])  # barh draws bottom-up: largest on top
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], [gating[n] for n in names], height=0.4, label="gating weight")
    ax.barh([i - 0.2 for i in y], [coefficients[n] for n in names], height=0.4, label="coefficient (after debiasing)")
    ax.set_yticks(list(y), names)
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def no_gating_text(model_id: str, coefficients: dict[str, float], source: str) -> str:
    """What inspect says for a model without gating (a sequence-classification model)."""
    if not coefficients:
        return f"model {model_id} has no gating: it is a single-score model (no attributes), the same for every prompt"
    from .tables import render

    ranked = sorted(coefficients, key=lambda n: -coefficients[n])
    weights = "steered by --weights" if source in ("override", "mask") else "fixed"
    return (f"model {model_id} has no gating: every prompt gets the same label weights ({weights}); "
            f"score = sum of weight x label logit\n" + render(["attribute", "weight"], [[n, coefficients[n]] for n in ranked]))  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from .score_sources import connect
    from .main import load_scorer, parse_weights
    from .tables import weights_table

    if args.plot and not args.plot.lower().endswith(".png"):
        raise InvalidInputError(f"--plot: {args.plot}: the chart is written as PNG; name it .png", field="plot")
    try:
        prompt = json.loads(args.prompt)
    except json.JSONDecodeError:
        prompt = args.prompt  # a plain string prompt
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    weights = parse_weights(args.weights)
    if args.server:
        with connect(args) as client:
            result = client.inspect(prompt, weights)
    else:
        from ..model.conversation import as_prompt

        result = load_scorer(args).inspect(as_prompt(prompt), weights)
    has_gating = bool(result.gating)  # a model kind without gating answers with an empty gating
    ranked = dict(sorted(result.gating.items(), key=lambda kv: -kv[1]))
    if args.json:
        print(json.dumps({**asdict(result), "gating": ranked, "has_gating": has_gating}, indent=2))
    elif has_gating:
        print(f"model {result.model_id}; {result.num_tokens} prompt tokens; weights: {result.weights_source}")
        print(weights_table(result.gating, result.coefficients))
    else:
        print(no_gating_text(result.model_id, result.coefficients, result.weights_source))
    if args.plot and not has_gating:
        print(f"--plot: nothing drawn: {result.model_id} has no gating", file=sys.stderr)
        return 1
    if args.plot:
        plot_weights(result.gating, result.coefficients, f"{result.model_id}: {prompt[-1]['content'][:60]}", args.plot)
    return 0
