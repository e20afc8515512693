"""PairSplit: the preference pairs of one split with their stored features at every candidate layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.schema import PreferencePair
from .stage2 import PreferencePairs


@dataclass
class PairSplit:
    """Pairs of one split at every stored layer: prompt, chosen, rejected (N, L, H) and the pairs themselves."""

    pairs: list[PreferencePair]
    prompt: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor

    def at(self, i: int) -> PreferencePairs:
        return PreferencePairs(prompt=self.prompt[:, i], chosen=self.chosen[:, i], rejected=self.rejected[:, i])
