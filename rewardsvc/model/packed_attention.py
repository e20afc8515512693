"""Variable-length attention for packed batches (rows concatenated into one sequence, positions restarting
at 0 for each row).

transformers alone already scores a packed batch correctly: it reads the position restarts and builds a
block-diagonal causal mask for SDPA, but that mask is dense (S x S) and SDPA computes every masked block.
On CUDA, `torch.nn.attention.varlen.varlen_attn` (part of torch, nothing to download) takes the row
boundaries instead and skips them. `packed_attention(model)` switches a model to it for one forward.
On CPU the same plumbing runs with a per-row SDPA kernel (`segment_attention`), which is also the test
oracle for the boundaries.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..errors import BackboneError

NAME = "rewardsvc_packed"
_registered = False


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative row boundaries (int32, N+1) and the longest row, from 1-D packed position ids."""
    starts = torch.nonzero(position_ids == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise BackboneError("packed attention: position ids must start each row at 0")
    total = torch.tensor([position_ids.numel()], device=position_ids.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def segment_attention(q, k, v, cu, max_len, scale):
    """Causal attention per row with SDPA: q (S, Hq, D), k/v (S, Hkv, D) -> (S, Hq, D)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def _varlen(q, k, v, cu, max_len, scale):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1])


def _forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query (1, Hq, S, D), key/value (1, Hkv, S, D) -> ((1, S, Hq, D), None)."""
    position_ids = kwargs.get("position_ids")
    if query.shape[0] != 1 or position_ids is None:
        raise BackboneError("packed attention needs one packed row and its position ids")
    cu, max_len = cu_seqlens(position_ids.reshape(-1))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (S, H, D)
    kernel = _varlen if varlen_available(query.device) else segment_attention
    return kernel(q, k, v, cu, max_len, scaling).unsqueeze(0), None


def _no_mask(*args, **kwargs):
    return None  # the row boundaries come from the position ids


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _forward)
    AttentionMaskInterface.register(NAME, _no_mask)
    _registered = True


@contextlib.contextmanager
def packed_attention(model):
    """Within the block the model attends with row boundaries from its position ids (one owner thread)."""
    _register()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
