"""Backbone pass over encoded conversations -> response and prompt embeddings.

One forward gives both embeddings (the prompt anchor lies inside the conversation). Shared by the scorer
and by training's embedding extraction, so that training embeds exactly what serving scores.

Three ways to run the same maths (`batch_plan` says which conversations go together):
- padded (default on CPU): length-sorted, right-padded batches under a token budget;
- packed (default on CUDA): rows concatenated without padding, per-sequence position ids;
- shared prompts (`share_prompts`): conversations whose tokens start with the same prompt run it once and
  the responses continue from its key/value cache; the prompt embedding comes from that one prompt pass;
- one per forward (`batch_invariant`): every conversation alone, so its result cannot depend on neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backbone import Backbone
from .batch_plan import plan_packed_batches, plan_padded_batches, plan_shared_prompts
from .encoding import EncodedConversation


@dataclass(frozen=True)
class Embeddings:
    response: torch.Tensor  # (N, H) float32, hidden state at the response anchor
    prompt: torch.Tensor  # (N, H) float32, hidden state at the prompt anchor

    def rows(self, index: list[int]) -> "Embeddings":
        """The embeddings of these rows, in this order (several head sets reading one backbone forward)."""
        at = torch.tensor(index, dtype=torch.long)
        return Embeddings(response=self.response[at], prompt=self.prompt[at])


def embed_encoded(
    backbone: Backbone,
    encoded: Sequence[EncodedConversation],
    token_budget: int,
    max_batch_size: int,
    *,
    share_prompts: bool = False,
    batch_invariant: bool = False,
    packed: bool = False,
) -> Embeddings:
    """Embeddings in input order."""
    H = backbone.hidden_size
    response = torch.empty((len(encoded), H))
    prompt = torch.empty((len(encoded), H))
    if batch_invariant:
        # One conversation per forward, no padding: the same shapes and kernels whatever the neighbours.
        for i, e in enumerate(encoded):
            hidden = backbone.hidden_at([list(e.input_ids)], [[e.prompt_anchor, e.response_anchor]])
            prompt[i], response[i] = hidden[0, 0], hidden[0, 1]
        return Embeddings(response=response, prompt=prompt)
    if not attention_only(backbone.model.config):
        # Linear-attention / state-space blocks carry state across a packed row's boundary and keep no key/value
        # cache to continue: such a model runs padded, each conversation whole.
        share_prompts = packed = False
    rest = list(range(len(encoded)))
    if share_prompts:
        # Under sliding-window attention a continued cache is exact only while the whole conversation fits in
        # the window; longer ones run the flat way.
        window = attention_window(backbone.model.config)
        eligible = [i for i, e in enumerate(encoded) if window is None or e.num_tokens <= window]
        found, _ = plan_shared_prompts([encoded[i].input_ids[: encoded[i].prompt_anchor + 1] for i in eligible])
        groups = [[eligible[j] for j in group] for group in found]
        grouped = {i for group in groups for i in group}
        rest = [i for i in rest if i not in grouped]
        for group in groups:
            _embed_shared_prompt(backbone, encoded, group, token_budget, max_batch_size, response, prompt)
    lengths = [encoded[i].num_tokens for i in rest]
    plan = plan_packed_batches if packed else plan_padded_batches
    run = backbone.hidden_packed if packed else backbone.hidden_at
    for batch in plan(lengths, token_budget, max_batch_size):
        batch = [rest[j] for j in batch]
        hidden = run(
            [list(encoded[i].input_ids) for i in batch],
            [[encoded[i].prompt_anchor, encoded[i].response_anchor] for i in batch],
        )  # (b, 2, H)
        index = torch.tensor(batch)
        prompt[index] = hidden[:, 0]
        response[index] = hidden[:, 1]
    return Embeddings(response=response, prompt=prompt)


ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def attention_only(config) -> bool:
    """Whether every block mixes tokens by (full or sliding-window) attention alone, as the config's
    `layer_types` (or `layers_block_type`) say; then the attention mask keeps packed rows apart and a prompt's
    key/value cache is all the state a continuation needs. Hybrid models (linear attention, Mamba blocks) are not."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t not in ATTENTION_LAYER_TYPES for t in layer_types):
        return False
    block_types = getattr(config, "layers_block_type", None)
    return block_types is None or all(t == "attention" for t in block_types)


def attention_window(config) -> int | None:
    """Tokens a sliding-window attention layer attends to (None: every layer sees the whole sequence)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def _embed_shared_prompt(backbone, encoded, group, token_budget, max_batch_size, response, prompt) -> None:
    """One prompt pass, then the group's responses in length-sorted batches continuing from its cache."""
    first = encoded[group[0]]
    start = first.prompt_anchor + 1  # every member's prompt is input_ids[:start] (plan_shared_prompts)
    prompt_hidden, kv = backbone.prompt_cache(list(first.input_ids[:start]))
    tails = [encoded[i].input_ids[start:] for i in group]
    anchors = [encoded[i].response_anchor - start for i in group]  # >= 0: the encoder puts it after the prompt
    # The budget counts the response tokens; each row also attends to the `start` cached prompt positions.
    for batch in plan_padded_batches([len(t) for t in tails], token_budget, max_batch_size):
        hidden = backbone.hidden_after_prompt(kv, [list(tails[j]) for j in batch], [[anchors[j]] for j in batch])
        index = torch.tensor([group[j] for j in batch])
        response[index] = hidden[:, 0]
        prompt[index] = prompt_hidden
