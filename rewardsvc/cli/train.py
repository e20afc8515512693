"""`rewardsvc train`: the default ArmoRM recipe (stage 1 + debiasing + stage 2) on ../shared/data."""

from __future__ import annotations

import argparse
import json
import os

from ..config import BackboneConfig

INPUT_FORMAT = """\
input: the shared data directory (--data-dir, $REWARDSVC_DATA_DIR, else ../shared/data), one folder per
  source as described in docs/DATA.md; nothing else to prepare
output: a heads checkpoint directory (--out): rewardsvc.json + heads.safetensors + MODEL_CARD.md
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for the trained heads checkpoint")
    parser.add_argument("--work-dir", default="artifacts/train", help="cache of data sets and embeddings (resumable)")
    parser.add_argument("--data-dir", help="the shared data directory (default: ../shared/data)")
    parser.add_argument("--backbone", default=BackboneConfig.model, help="backbone: embedded default, directory, hub id or .gguf")
    parser.add_argument("--adapter", help="a stage-0 LoRA adapter (rewardsvc train-backbone) applied to the backbone; "
                                          "shipped inside the checkpoint")
    parser.add_argument("--stage2-pairs", choices=("unseen-by-stage0", "all"), default="unseen-by-stage0",
                        help="with --adapter: unseen-by-stage0 fits stage 2 on the training pairs the adapter's stage 0 "
                             "did not train on (its state records them; all pairs where it has no record); all: every "
                             "pair (the adapter has memorised its own: docs/TRAINING.md)")  # fmt: skip
    parser.add_argument("--state-cache", help="with --adapter: the state cache of its train-backbone run (--cache-dir); the "
                                              "conversations it holds run only the adapted blocks when embedded, the "
                                              "others are added to it for the next refit (training.adapted_features)")  # fmt: skip
    parser.add_argument("--device-map", help="spread the backbone over several GPUs for the embedding pass: auto, "
                                             "balanced, sequential, or JSON {module: device} (docs/DEPLOY.md)")  # fmt: skip
    parser.add_argument("--name", default="rewardsvc-default-smollm2-135m")
    parser.add_argument("--caps-scale", type=float, default=1.0,
                        help="multiply every per-source cap of rewardsvc.training.data.build.DEFAULT_CAPS (training "
                             "sources are uncapped; this scales the evaluation caps)")  # fmt: skip
    parser.add_argument("--cap", action="append", default=[], metavar="STAGE/SOURCE=N",
                        help="set one per-source cap, repeatable (N rows at most; 0 leaves the source out, 'none' "
                             "uncaps it), e.g. --cap stage1/arena-bench=0 --cap stage2/arena-bench=0 for a run "
                             "without the correctness data; an attribute whose every source is left out gets no head")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=1024, help="conversations longer than this are left out (counted)")
    parser.add_argument("--layers", default="8,12,16",
                        help="candidate feature layers (backbone blocks), comma-separated; the best on validation is served")  # fmt: skip
    parser.add_argument("--embed", choices=("all", "stored"), default="all",
                        help="all: embed every conversation the feature store lacks first; stored: fit on what the "
                             "store already holds (a partial, resumable CPU run; provenance counts the rest)")  # fmt: skip
    parser.add_argument("--max-chars", type=int, default=2000, help="training prompts/responses longer than this are left out")
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation on the held-out mix")
    parser.add_argument("--length-calibration", choices=("pairwise", "balanced-spearman", "per-category", "chat-spearman", "none"),
                        default="chat-spearman", help="how the length offset is chosen after stage 2 (every method is "
                        "also fit and recorded in the provenance; docs/TRAINING.md)")  # fmt: skip


def scaled_caps(scale: float) -> dict[str, int | None]:
    """Uncapped sources (None) stay uncapped."""
    from ..training.data.build import DEFAULT_CAPS  # here, not at the top: it costs --help about 0.4 s

    return {k: None if v is None else max(1, round(v * scale)) for k, v in DEFAULT_CAPS.items()}


def caps_from(args: argparse.Namespace) -> dict[str, int | None] | None:
    """--caps-scale, then each --cap on top; None when neither changes the defaults."""
    from ..errors import InvalidInputError

    caps = scaled_caps(args.caps_scale) if args.caps_scale != 1.0 else {}
    for item in args.cap:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            caps[key.strip()] = None if value.strip().lower() == "none" else int(value)
        except ValueError:
            raise InvalidInputError(f"--cap: expected STAGE/SOURCE=N (N an integer or 'none'), got {item!r}",
                                    field="cap") from None  # fmt: skip
    return caps or None


def _layers(text: str) -> tuple[int, ...]:
    from ..errors import InvalidInputError

    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InvalidInputError(f"--layers: expected comma-separated integers, got {text!r}", field="layers") from None


def existing_data_dir(args: argparse.Namespace) -> str:
    """--data-dir, else the default; checked here so the message names the flag, not the Python argument."""
    from ..errors import InvalidInputError
    from ..training.data import DATA_DIR_ENV, default_data_dir

    data_dir = args.data_dir or default_data_dir()
    if not os.path.isdir(data_dir):
        raise InvalidInputError(
            f"--data-dir: the data directory {data_dir} does not exist; pass --data-dir DIR or set ${DATA_DIR_ENV}",
            field="data_dir",
        )
    return str(data_dir)


def run(args: argparse.Namespace) -> int:
    existing_data_dir(args)
    caps = caps_from(args)
    if args.state_cache and not args.adapter:
        from ..errors import InvalidInputError

        raise InvalidInputError("--state-cache needs --adapter: it holds the plain backbone's states below a stage-0 adapter's "
                                "blocks, which only a refit on that adapter can use", field="state_cache")  # fmt: skip
    from ..training.pipeline import TrainConfig, run_training  # torch and transformers: only past the checks
    from .main import quiet_transformers

    quiet_transformers()

    config = TrainConfig(
        out_dir=args.out, work_dir=args.work_dir, data_dir=args.data_dir,
        backbone=BackboneConfig(model=args.backbone, adapter=args.adapter, device_map=args.device_map),
        name=args.name, max_tokens=args.max_tokens, token_budget=args.token_budget, max_chars=args.max_chars,
        caps=caps, seed=args.seed, evaluate=not args.no_eval,
        layers=_layers(args.layers), embed=args.embed, length_calibration=args.length_calibration,
        stage2_pairs=args.stage2_pairs, state_cache=args.state_cache,
    )  # fmt: skip
    provenance = run_training(config)
    print(json.dumps({"out": args.out, "data": provenance["data"], "metrics": provenance["metrics"],
                      "timings_s": provenance["timings_s"]}, indent=2))  # fmt: skip
    return 0
