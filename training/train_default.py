"""Reproduce the packaged default heads from ../shared/data (thin entry point; logic in rewardsvc).

    python training/train_default.py            # writes rewardsvc/default_model/ (heads only)

Same as `rewardsvc train --out rewardsvc/default_model --work-dir artifacts/train`. Features are stored in
artifacts/train/features (content-addressed, resumable: interrupt it and run it again); a re-run with the same
data only refits. `--embed stored` fits on what is stored so far (how the packaged default was made on a CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rewardsvc.cli.main import main

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARGS = [
    "train", "--out", str(REPO / "rewardsvc" / "default_model"), "--work-dir", str(REPO / "artifacts" / "train"),
]  # fmt: skip

if __name__ == "__main__":
    sys.exit(main(DEFAULT_ARGS + sys.argv[1:]))
