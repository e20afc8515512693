"""Features of a stage-0-adapted backbone through its plain backbone's state cache: the refit's embedding pass at
about (L - s)/L of its cost for every conversation the cache holds, and no more than a full pass for the others.

A LoRA adapter restricted to blocks s..L-1 (peft `layers_to_transform`, what `train-backbone --top-blocks`
writes) leaves blocks 0..s-1 and the embeddings as they are, so the residual stream after s blocks of the
adapted backbone is the plain backbone's, which stage 0 cached (state_cache.py, keyed by the plain backbone's
id). For a cached conversation only the adapted blocks run (top_blocks.forward_blocks, the decoder's own modules
with the adapter merged). Any other conversation runs blocks 0..s-1 once, its states are added to the cache,
and the adapted blocks run from them: that costs what the full forward would, and every later refit of an
adapter whose first block is s (another learning rate, more epochs) finds the whole data set cached.

Precision: the cache holds float16 states (unless made with float32), and every feature here is computed from
the states as stored, so a feature differs from the full float32 forward by the float16 rounding of the
block-s residual (bench/refit_from_cache.py measured at most 0.00066 of the features' scale). Stage 0 trained
its adapter on exactly these cached states. tests/training/test_adapted_features.py checks both paths against
the served adapted backbone, and the refit's provenance counts the conversations each way.
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
from .state_cache import DTYPES, StateCache, block_output_module, state_key
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


class _StopAfterBlock(Exception):
    """Raised by a forward hook once the residual after the cache block is captured: the blocks above run from it."""


class CachedAdaptedFeatures:
    """A FeaturesFn (feature_store.extract_features) for an adapted backbone, through the plain backbone's state
    cache. A conversation the cache holds runs the adapted blocks only. One it lacks runs the blocks below the
    adapter once (they are the plain backbone's), its states there are added to the cache, and the adapted blocks
    run from them in the same way, so the next refit of any adapter on the same blocks finds it too.
    `from_cache` and `added_to_cache` count the conversations each way, for the run's provenance, and
    `not_cacheable` those whose states overflow the cache's float16 (used exact, not stored)."""

    def __init__(self, backbone, plain_config: BackboneConfig, cache_dir: str | os.PathLike, adapter: str | os.PathLike,
                 layers: Sequence[int]):  # fmt: skip
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
        self.backbone = backbone
        self.decoder = decoder_of(backbone.model)
        check_decoder(self.decoder)
        self.plain_id = backbone_source(replace(plain_config, adapter=None))[1]
        self.cache = StateCache(cache_dir, self.plain_id, backbone.hidden_size)
        self.dtype = next(self.decoder.parameters()).dtype
        self.from_cache = self.added_to_cache = self.not_cacheable = 0

    def key(self, encoded: EncodedConversation) -> str:
        return state_key(self.plain_id, encoded.input_ids, self.start)

    def _states_below_adapter(self, encoded: EncodedConversation) -> torch.Tensor:
        """(T, H) residual after `start` blocks: the model's own forward, observed and stopped there."""
        captured = []

        def hook(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopAfterBlock

        handle = block_output_module(self.decoder, self.start).register_forward_hook(hook)
        try:
            self.backbone.model(input_ids=torch.tensor([list(encoded.input_ids)], device=self.backbone.device), use_cache=False)
        except _StopAfterBlock:
            pass
        finally:
            handle.remove()
        return captured[0][0].float().cpu()

    @torch.no_grad()
    def __call__(self, encoded: Sequence[EncodedConversation]) -> tuple[torch.Tensor, torch.Tensor]:
        n, L, H = len(encoded), len(self.layers), self.cache.hidden_size
        response, prompt = torch.empty(n, L, H), torch.empty(n, L, H)
        new_keys, new_states = [], []
        for i, e in enumerate(encoded):
            key = self.key(e)
            if key in self.cache:
                states = self.cache.get(key)
                self.from_cache += 1
            else:
                states = self._states_below_adapter(e)
                stored = states.to(DTYPES[self.cache.dtype])
                if torch.isfinite(stored).all():
                    if key not in new_keys:
                        new_keys.append(key)
                        new_states.append(stored)
                    # The adapted blocks run from the states as the cache stores them: this refit and the next agree.
                    states = stored.float()
                    self.added_to_cache += 1
                else:  # beyond float16's range: not cacheable, so its features come from the exact states
                    self.not_cacheable += 1
            hidden = states.to(self.backbone.device, self.dtype).unsqueeze(0)  # (1, T, H): one unpadded sequence
            for j, layer in enumerate(self.layers):
                top = forward_blocks(self.decoder, hidden, self.start, layer)[0].float().cpu()  # (T, H), final-normed
                prompt[i, j], response[i, j] = top[e.prompt_anchor], top[e.response_anchor]
        if new_keys:
            self.cache.add(new_keys, [self.start] * len(new_keys), new_states)
        return response, prompt
