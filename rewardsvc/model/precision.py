"""The backbone's numeric precision: float32, bfloat16, or mixed (bfloat16 for the lower blocks, float32 for
the top blocks, the final norm and the heads).

Why mixed: on CPUs with native bf16 matmuls (AVX512-bf16, AMX) bf16 is faster than fp32, but a whole-bf16
backbone moved the shipped default's scores by 0.25 score std on an Intel AMX machine (docs/PERFORMANCE.md).
The rounding that matters most is the last one before the features, so the mixed candidate keeps the top
quarter of the blocks in fp32: most of the matmuls run in bf16, the residual stream is carried back to fp32
before the blocks closest to the heads. The heads always run in fp32 (they are a separate module).

How: every block gets a forward pre-hook that casts its floating inputs (hidden states, the rotary cos/sin,
a float attention mask) to the block's own dtype. The embedding and the rotary embedding stay fp32, so the
fp32 blocks get fp32 cos/sin. Applied after early exit (truncation), so "top" means the blocks that run.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch

from ..errors import BackboneError
from .backbone import Backbone, _blocks_and_norm

PRECISIONS = ("float32", "bfloat16", "mixed")
_HOOK_ATTRIBUTE = "_rewardsvc_cast_hook"
_CAST_KWARGS = ("hidden_states", "position_embeddings", "attention_mask")


def mixed_fp32_top_blocks(depth: int) -> int:
    """Blocks kept in fp32 by the mixed precision: the top quarter, at least one (so a 16-block backbone runs
    blocks 1-12 in bf16 and 13-16 in fp32)."""
    if depth < 2:
        raise BackboneError(f"mixed precision needs at least 2 backbone blocks, the backbone has {depth}")
    return max(1, math.ceil(depth / 4))


def precision_name(backbone: Backbone) -> str:
    """float32, bfloat16, float16, or `mixed(bfloat16 blocks 1-12, float32 blocks 13-16)`."""
    if backbone.fp32_top_blocks:
        depth = backbone.depth
        low = depth - backbone.fp32_top_blocks
        return f"mixed(bfloat16 blocks 1-{low}, float32 blocks {low + 1}-{depth})"
    return str(backbone.dtype).replace("torch.", "")


def precision_kind(backbone: Backbone) -> str:
    """The PRECISIONS entry a backbone runs at ("mixed" for any mixed split), or its dtype's name."""
    return "mixed" if backbone.fp32_top_blocks else str(backbone.dtype).replace("torch.", "")


def apply_precision(backbone: Backbone, precision: str) -> Backbone:
    """Convert a float32 backbone in place to `precision` (one of PRECISIONS) and return it. Idempotent for
    the precision it already has; a backbone already converted to another precision is an error (bf16
    weights cannot be brought back to their fp32 values)."""
    if precision not in PRECISIONS:
        raise BackboneError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    current = precision_kind(backbone)
    if current == precision:
        return backbone
    if current != "float32":
        raise BackboneError(f"cannot convert a {precision_name(backbone)} backbone to {precision}: convert a float32 copy")
    if precision == "bfloat16":
        backbone.model.to(torch.bfloat16)
        backbone.dtype = torch.bfloat16
    elif precision == "mixed":
        _, blocks, _ = _blocks_and_norm(backbone.model)
        top = mixed_fp32_top_blocks(len(blocks))
        for i, block in enumerate(blocks):
            if i < len(blocks) - top:
                block.to(torch.bfloat16)
            if getattr(block, _HOOK_ATTRIBUTE, None) is None:
                setattr(block, _HOOK_ATTRIBUTE, block.register_forward_pre_hook(_cast_to_block_dtype, with_kwargs=True))
        backbone.dtype = torch.bfloat16  # the dtype most of the compute runs in; precision_name says the split
        backbone.fp32_top_blocks = top
    return backbone


def precision_copy(backbone: Backbone, precision: str) -> Backbone:
    """A copy of a float32 backbone at `precision` (the model deep-copied; the tokenizer shared)."""
    if precision_kind(backbone) != "float32":
        raise BackboneError(f"precision_copy needs a float32 backbone, this one is {precision_name(backbone)}")
    clone = replace(backbone, model=copy.deepcopy(backbone.model))
    return apply_precision(clone, precision)


def _block_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _cast_to_block_dtype(module, args, kwargs):
    """Forward pre-hook: the block's floating inputs in the block's dtype (a bf16 block after an fp32 one, or
    the reverse, gets what its matmuls expect)."""
    dtype = _block_dtype(module)
    args = tuple(_cast(a, dtype) for a in args)
    kwargs = {k: (_cast(v, dtype) if k in _CAST_KWARGS else v) for k, v in kwargs.items()}
    return args, kwargs
