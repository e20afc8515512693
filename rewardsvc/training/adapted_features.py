"""Features of a stage-0-adapted backbone from its plain backbone's state cache: the refit's embedding pass at
about (L - s)/L of its cost for every conversation stage 0 cached.

A LoRA adapter restricted to blocks s..L-1 (peft `layers_to_transform`, what `train-backbone --top-blocks`
writes) leaves blocks 0..s-1 and the embeddings as they are, so the residual stream after s blocks of the
adapted backbone is the plain backbone's, which stage 0 cached (state_cache.py, keyed by the plain backbone's
id). For a cached conversation only the adapted blocks run (top_blocks.forward_blocks, the decoder's own modules
with the adapter merged); every other conversation takes the full forward it would take anyway.

Precision: the cache holds float16 states (unless made with float32), so a feature from it differs from the
full float32 forward by float16 rounding of the block-s residual, about 1e-3 of a state's scale. Stage 0
trained its adapter on exactly these cached states; tests/training/test_adapted_features.py bounds the
difference, and the refit's provenance counts the conversations that came from the cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..config import BackboneConfig
from ..errors import InvalidInputError
from ..model.encoding import EncodedConversation
from .feature_store import FeaturesFn
from .state_cache import StateCache, state_key
from .top_blocks import check_decoder, forward_blocks


def first_adapted_block(adapter: str | os.PathLike) -> int:
    """s: the lowest block a PEFT adapter changes. InvalidInputError (field `adapter`) when the adapter may change
    anything below its blocks (no `layers_to_transform`, extra trained modules or token embeddings)."""
    config_path = Path(adapter) / "adapter_config.json"
    if not config_path.is_file():
        raise InvalidInputError(f"{adapter} has no adapter_config.json: not a PEFT adapter directory", field="adapter")
    config = json.loads(config_path.read_text())
    blocks = config.get("layers_to_transform")
    if isinstance(blocks, int):
        blocks = [blocks]
    if not blocks:
        raise InvalidInputError(f"adapter {adapter} has no layers_to_transform: it may change every block, so no "
                                "cached state below it is the adapted backbone's", field="adapter")  # fmt: skip
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        raise InvalidInputError(f"adapter {adapter} also trains modules_to_save or token embeddings: the cached "
                                "states of the plain backbone are not the adapted backbone's", field="adapter")  # fmt: skip
    return min(int(b) for b in blocks)


class CachedAdaptedFeatures:
    """A FeaturesFn (feature_store.extract_features) for an adapted backbone that reads the plain backbone's
    state cache where it holds a conversation and falls back to `full` (the plain full forward) elsewhere.
    `from_cache` and `from_full` count the conversations each way, for the run's provenance."""

    def __init__(self, backbone, plain_config: BackboneConfig, cache_dir: str | os.PathLike, adapter: str | os.PathLike,
                 layers: Sequence[int], full: FeaturesFn):  # fmt: skip
        from ..model.backbone import decoder_of
        from ..model.backbone_loading import backbone_source

        if plain_config.quantization:
            raise InvalidInputError("the state cache is of the plain float backbone; a quantized backbone's states differ", field="state_cache")
        if not (Path(cache_dir) / "cache.json").is_file():
            raise InvalidInputError(f"{cache_dir} is not a state cache (no cache.json): see `rewardsvc train-backbone`", field="state_cache")
        self.start = first_adapted_block(adapter)
        self.layers = [int(x) for x in layers]
        if min(self.layers) <= self.start:
            raise InvalidInputError(f"layers {self.layers} must all lie above the adapter's first block ({self.start}): "
                                    "a cached state after that block cannot give a feature below it", field="layers")  # fmt: skip
        self.decoder = decoder_of(backbone.model)
        check_decoder(self.decoder)
        self.plain_id = backbone_source(replace(plain_config, adapter=None))[1]
        self.cache = StateCache(cache_dir, self.plain_id, backbone.hidden_size)
        self.full = full
        self.device, self.dtype = backbone.device, next(self.decoder.parameters()).dtype
        self.from_cache = self.from_full = 0

    def key(self, encoded: EncodedConversation) -> str:
        return state_key(self.plain_id, encoded.input_ids, self.start)

    @torch.no_grad()
    def __call__(self, encoded: Sequence[EncodedConversation]) -> tuple[torch.Tensor, torch.Tensor]:
        n, L, H = len(encoded), len(self.layers), self.cache.hidden_size
        response, prompt = torch.empty(n, L, H), torch.empty(n, L, H)
        cached = [i for i, e in enumerate(encoded) if self.key(e) in self.cache]
        rest = [i for i in range(n) if i not in set(cached)]
        for i in cached:
            e = encoded[i]
            # (1, T, H): one unpadded sequence, positions 0..T-1
            hidden = self.cache.get(self.key(e)).to(self.device, self.dtype).unsqueeze(0)
            for j, layer in enumerate(self.layers):
                top = forward_blocks(self.decoder, hidden, self.start, layer)[0].float().cpu()  # (T, H), final-normed
                prompt[i, j], response[i, j] = top[e.prompt_anchor], top[e.response_anchor]
        if rest:
            r, p = self.full([encoded[i] for i in rest])
            index = torch.tensor(rest)
            response[index], prompt[index] = r, p
        self.from_cache += len(cached)
        self.from_full += len(rest)
        return response, prompt
