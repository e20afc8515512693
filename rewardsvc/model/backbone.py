"""The frozen decoder backbone's forward pass: hidden states at the anchor positions, after the last block
(`hidden_at`, `hidden_packed`, `hidden_after_prompt` over a shared prompt's cache) or after several block
counts from one pass (`hidden_at_layers`). `truncate_backbone` drops the later blocks (early exit).

How a Backbone is made (Hugging Face directory, hub id, GGUF, the embedded default, quantization, adapters,
tokenizer checks) is model/backbone_loading.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BackboneError


@dataclass
class Backbone:
    """A loaded decoder (returning hidden states, no LM head) and its tokenizer."""

    model: Any  # a transformers PreTrainedModel whose forward returns last_hidden_state
    tokenizer: Any  # a fast tokenizer with a chat template
    model_id: str  # what was loaded, for provenance (never a local cache path)
    device: torch.device
    dtype: torch.dtype
    full_depth: int | None = None  # blocks before truncate_backbone dropped some; None = never truncated
    fp32_top_blocks: int = 0  # mixed precision (model/precision.py): the top blocks kept in fp32; 0 = one dtype

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def depth(self) -> int:
        """Number of decoder blocks the forward runs (after any truncate_backbone)."""
        return len(_blocks_and_norm(self.model)[1])

    def padded_inputs(self, rows: list[list[int]], positions: list[list[int]]):
        """Right-padded input_ids, attention_mask and the gather index (B, P), all on the model's device."""
        lengths = [len(r) for r in rows]
        T = max(lengths)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = 0  # any id works: padded positions are masked and never gathered
        input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        for row_positions, n in zip(positions, lengths):
            if any(not 0 <= p < n for p in row_positions):
                raise BackboneError(f"anchor positions {row_positions} outside a row of {n} tokens")
        device = self.device
        index = torch.tensor(positions, dtype=torch.long, device=device)  # (B, P)
        return input_ids.to(device), attention_mask.to(device), index

    @staticmethod
    def gather_positions(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H), index (B, P) -> (B, P, H)."""
        index = index.to(hidden.device)
        return torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    @torch.inference_mode()
    def hidden_at(self, rows: list[list[int]], positions: list[list[int]]) -> torch.Tensor:
        """Last-layer hidden states of each row at the given positions.

        rows: token ids per conversation (different lengths; right-padded here).
        positions: per row, the token positions to gather (e.g. [prompt_anchor, response_anchor]).
        Returns (B, P, H) float32 on CPU. Positions are indices into the unpadded row, so padding (on the
        right, masked out) cannot move them.
        """
        input_ids, attention_mask, index = self.padded_inputs(rows, positions)
        # use_cache=False: a scoring pass never decodes further, so keeping every block's keys/values is waste.
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.gather_positions(out.last_hidden_state, index).float().cpu()  # (B, P, H)

    @torch.inference_mode()
    def hidden_packed(self, rows: list[list[int]], positions: list[list[int]], attention: str = "auto") -> torch.Tensor:
        """`hidden_at` without padding: the rows are concatenated into one sequence whose position ids restart
        at 0 for each row. transformers reads the restarts as packed sequences and builds a block-diagonal
        causal mask (SDPA), or hands the boundaries to a variable-length attention kernel when the model was
        loaded with one. `attention`: `auto` uses torch's varlen kernel on CUDA (packed_attention.py) and that
        SDPA mask elsewhere; `boundaries` forces the row-boundary interface (per-row SDPA off CUDA). No cache
        (it would switch the packed detection off)."""
        from .packed_attention import packed_attention, varlen_available

        lengths = [len(r) for r in rows]
        for row_positions, n in zip(positions, lengths):
            if any(not 0 <= p < n for p in row_positions):
                raise BackboneError(f"anchor positions {row_positions} outside a row of {n} tokens")
        input_ids = torch.tensor([[t for r in rows for t in r]], dtype=torch.long, device=self.device)
        position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(self.device)
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        flat = torch.tensor([[s + p for p in ps] for s, ps in zip(starts, positions)], dtype=torch.long, device=self.device)
        boundaries = attention == "boundaries" or (attention == "auto" and varlen_available(self.device))
        with packed_attention(self.model) if boundaries else contextlib.nullcontext():
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state[0]  # (S, H)
        return hidden[flat].float().cpu()  # (B, P, H)

    @torch.inference_mode()
    def prompt_cache(self, prefix: list[int]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run a shared prompt once: (its last token's hidden state (H,) float32 on CPU, the per-block
        (key, value) tensors (1, heads, P, head_dim) on the device) for `hidden_after_prompt`."""
        input_ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, use_cache=True)
        cache = _output_cache(out)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return out.last_hidden_state[0, -1].float().cpu(), kv

    @torch.inference_mode()
    def hidden_after_prompt(
        self, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: list[list[int]], positions: list[list[int]]
    ) -> torch.Tensor:
        """`hidden_at` for rows that continue a prompt whose cache `prompt_cache` gave: each row holds only the
        tokens after the prompt, positions index into those tokens. The rows run as one right-padded batch
        against the prompt's keys/values (shared, expanded per row) with positions P, P+1, ... Returns (B, P, H)."""
        from transformers import DynamicCache

        input_ids, attention_mask, index = self.padded_inputs(rows, positions)
        b, t = input_ids.shape
        prompt_len = kv[0][0].shape[-2]
        expanded = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv]
        cache = DynamicCache(ddp_cache_data=expanded, config=self.model.config)
        mask = torch.cat([torch.ones((b, prompt_len), dtype=attention_mask.dtype, device=self.device), attention_mask], 1)
        position_ids = torch.arange(prompt_len, prompt_len + t, device=self.device).unsqueeze(0).expand(b, -1)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{_cache_kwarg(self.model): cache}
        )
        return self.gather_positions(out.last_hidden_state, index).float().cpu()

    @torch.inference_mode()
    def hidden_at_layers(self, rows: list[list[int]], positions: list[list[int]], layers: list[int]) -> torch.Tensor:
        """`hidden_at` for several block counts at once, from one forward pass.

        layers: block counts l, each in 1..depth. For l < depth the result is the decoder's final norm applied
        to the residual stream after l blocks (hidden_states[l]); for l == depth it is last_hidden_state. So
        [:, :, j] equals what `hidden_at` gives on the backbone truncated to layers[j] blocks.
        Returns (B, P, L, H) float32 on CPU, L = len(layers), in the order given.
        """
        _, blocks, norm = _blocks_and_norm(self.model)
        depth = len(blocks)
        layers = [int(layer) for layer in layers]
        if not layers:
            raise BackboneError("hidden_at_layers: layers is empty")
        bad = [layer for layer in layers if not 1 <= layer <= depth]
        if bad:
            raise BackboneError(f"hidden_at_layers: layers {bad} outside 1..{depth} (the backbone's depth is {depth})")
        input_ids, attention_mask, index = self.padded_inputs(rows, positions)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        states = out.hidden_states
        if states is None or len(states) != depth + 1:
            raise BackboneError(
                f"hidden_at_layers: expected {depth + 1} hidden states from a {depth}-block backbone, "
                f"got {None if states is None else len(states)}"
            )
        per_layer = []
        for layer in layers:
            if layer == depth:
                per_layer.append(self.gather_positions(out.last_hidden_state, index))  # already normed
            else:
                # The norm acts on each position alone, so gathering first gives the same values for less work.
                # Under a device_map the block's output and the norm may sit on different devices.
                gathered = self.gather_positions(states[layer], index).to(next(norm.parameters()).device)
                per_layer.append(norm(gathered).to(out.last_hidden_state.device))
        return torch.stack(per_layer, dim=2).float().cpu()  # (B, P, L, H)


def _cache_kwarg(model) -> str:
    """The forward's cache argument: `cache` in transformers 5.x, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "layers"):
        raise BackboneError("the backbone returned no key/value cache; shared-prompt scoring needs one")
    return cache


def _blocks_and_norm(model):
    """(decoder, its blocks `layers`, its final `norm`) of a hidden-state model or a *ForCausalLM."""
    decoder = decoder_of(model)
    blocks = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not isinstance(norm, torch.nn.Module):
        raise BackboneError(
            f"{type(decoder).__name__} has no decoder blocks `.layers` and final norm `.norm`: "
            "feature layers and early exit need a decoder laid out like Llama"
        )
    return decoder, blocks, norm


def truncate_backbone(backbone: Backbone, num_blocks: int) -> None:
    """Keep only the first `num_blocks` decoder blocks (early exit): the later blocks never run, and the
    last_hidden_state becomes the final norm of the residual stream after `num_blocks` blocks. In place.
    `backbone.full_depth` keeps the depth before truncation; `model_id` is left as it is (it names what was
    loaded, and keys stores of `hidden_at_layers` features, which truncation does not change)."""
    decoder, blocks, _ = _blocks_and_norm(backbone.model)
    depth = len(blocks)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 1 <= num_blocks <= depth:
        raise BackboneError(
            f"cannot truncate the backbone to {num_blocks!r} blocks: it has {depth} blocks (allowed 1..{depth})"
        )
    if num_blocks == depth:
        return
    if backbone.fp32_top_blocks:  # its fp32 blocks are the top ones: truncating would drop them
        raise BackboneError("truncate the backbone before converting it to mixed precision (model/precision.py)")
    decoder.layers = blocks[:num_blocks]
    config = decoder.config
    config.num_hidden_layers = num_blocks
    # Per-block lists (attention types of hybrid models) must stay as long as the blocks.
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == depth:
        config.layer_types = type(layer_types)(layer_types[:num_blocks])
    if backbone.model.config is not config:
        backbone.model.config.num_hidden_layers = num_blocks
    if backbone.full_depth is None:
        backbone.full_depth = depth


def decoder_of(model):
    """The hidden-state model inside a *ForCausalLM (or the model itself)."""
    prefix = getattr(model, "base_model_prefix", "model")
    inner = getattr(model, prefix, None)
    return inner if inner is not None and inner is not model else model
