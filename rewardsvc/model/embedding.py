"""Backbone pass over encoded conversations -> response and prompt embeddings.

One forward gives both embeddings (the prompt anchor lies inside the conversation). Shared by the scorer
and by training's embedding extraction, so that training embeds exactly what serving scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backbone import Backbone
from .batch_plan import plan_padded_batches
from .encoding import EncodedConversation


@dataclass(frozen=True)
class Embeddings:
    response: torch.Tensor  # (N, H) float32, hidden state at the response anchor
    prompt: torch.Tensor  # (N, H) float32, hidden state at the prompt anchor


def embed_encoded(
    backbone: Backbone, encoded: Sequence[EncodedConversation], token_budget: int, max_batch_size: int
) -> Embeddings:
    """Embeddings in input order, computed in length-sorted padded batches under `token_budget`."""
    H = backbone.hidden_size
    response = torch.empty((len(encoded), H))
    prompt = torch.empty((len(encoded), H))
    lengths = [e.num_tokens for e in encoded]
    for batch in plan_padded_batches(lengths, token_budget, max_batch_size):
        hidden = backbone.hidden_at(
            [list(encoded[i].input_ids) for i in batch],
            [[encoded[i].prompt_anchor, encoded[i].response_anchor] for i in batch],
        )  # (b, 2, H)
        index = torch.tensor(batch)
        prompt[index] = hidden[:, 0]
        response[index] = hidden[:, 1]
    return Embeddings(response=response, prompt=prompt)
