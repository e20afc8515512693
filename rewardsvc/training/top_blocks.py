"""Run a decoder's blocks start..stop-1 from a stored residual stream, then its final norm.

This is the decoder's own forward (transformers 5.x `LlamaModel.forward`) entered in the middle: the same
causal mask from `create_causal_mask`, the same rotary `position_embeddings` from the decoder's `rotary_emb`,
the same block modules called the same way. Only the part below `start` is replaced by its cached output.
A cached conversation is one unpadded sequence, so positions are 0..T-1 and the mask is plain causal.

Only decoders laid out like Llama (`embed_tokens`, `layers`, `norm`, `rotary_emb`, every block full causal
attention) are accepted; sliding-window or hybrid blocks would need per-block masks, which are refused here
rather than approximated.
"""

from __future__ import annotations

import torch

from ..errors import BackboneError


def check_decoder(decoder) -> None:
    """BackboneError unless `decoder` can be entered in the middle as forward_blocks does."""
    for name in ("layers", "norm", "rotary_emb"):
        if getattr(decoder, name, None) is None:
            raise BackboneError(f"{type(decoder).__name__} has no `.{name}`: stage 0 from a state cache needs a Llama-like decoder")
    layer_types = getattr(decoder.config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise BackboneError(f"stage 0 from a state cache needs full-attention blocks; this decoder has {sorted(set(layer_types))}")


def forward_blocks(decoder, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """hidden (B, T, H): the residual stream after `start` blocks of B unpadded sequences of T tokens.
    Returns the final norm of the residual stream after `stop` blocks, (B, T, H): what the decoder truncated
    to `stop` blocks returns as last_hidden_state for the same tokens."""
    from transformers.masking_utils import create_causal_mask

    if not 0 <= start < stop <= len(decoder.layers):
        raise BackboneError(f"blocks {start}..{stop - 1} are not a non-empty range of the decoder's {len(decoder.layers)} blocks")
    batch, length, _ = hidden.shape
    position_ids = torch.arange(length, device=hidden.device).unsqueeze(0).expand(batch, -1)
    mask = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    for block in decoder.layers[start:stop]:
        out = block(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids)
        hidden = out[0] if isinstance(out, tuple) else out
    return decoder.norm(hidden)
