"""GPU scoring at the hardware limit (issue 11, item 6): one script, JSON lines, each mode with tokens/s,
model FLOP utilisation (MFU), peak memory and the max score deviation against one-at-a-time.

Backbone: a Llama-3-8B-shaped random bf16 LlamaModel with random ArmoRM heads (19 attributes, 3x1024 gating),
on the workload of ../shared/bench/reference_pipeline_gpu.py (256 conversations, prompts 64-512 and responses
64-1024 tokens, seed 0: 214,814 tokens). Modes:
- one_per_forward: one conversation per forward, the reference pipeline's way; also what --batch-invariant
  runs, so it is the batch-invariant mode's throughput (checked bitwise against other batch compositions);
- padded: length-sorted padded batches under the token budget (8192);
- packed: padding-free batches (per-sequence position ids; torch varlen attention on CUDA);
- groups_flat / groups_shared: GRPO-like groups (32 prompts of 512 tokens x 8 responses of 64-512 tokens),
  every conversation whole vs the prompt run once and its key/value cache reused;
- int8 / nf4: the padded path on a bitsandbytes 8-bit / 4-bit copy of the backbone (CUDA and bitsandbytes
  only; otherwise a `skipped` row says why).
MFU: 2 x non-embedding params x tokens + 2 x layers x L^2 x hidden per conversation (the reference script's
count; the groups count the flat work for both modes), over the measured matmul peak.

    python bench/gpu.py [--tiny] [--n 256] [--token-budget 8192] [--skip-quantized]

`--tiny` runs the same code on CPU in seconds (a 2-block Llama of hidden 64; tests/bench runs it).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, machine  # noqa: E402

from rewardsvc.config import HeadsConfig, ScorerConfig  # noqa: E402
from rewardsvc.model.backbone import Backbone  # noqa: E402
from rewardsvc.model.encoding import EncodedConversation  # noqa: E402
from rewardsvc.model.heads import ArmoHeads  # noqa: E402
from rewardsvc.model.scorer import Scorer  # noqa: E402

K = 19


def env_row(device: torch.device) -> dict:
    row = {"kind": "env", **machine()}
    for module in ("bitsandbytes", "peft", "flash_attn"):
        try:
            row[module] = getattr(__import__(module), "__version__", "yes")
        except Exception:  # noqa: BLE001 - any import failure means "not usable here"
            row[module] = None
    from rewardsvc.model.packed_attention import varlen_available

    row["varlen_attn"] = varlen_available(device)
    return row


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    sync(device)
    return 2 * size**3 * 5 / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_scorer(tiny: bool, device: torch.device, dtype: torch.dtype, token_budget: int) -> Scorer:
    from transformers import LlamaConfig, LlamaModel

    if tiny:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1000)  # fmt: skip
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(dtype)
        model = LlamaModel(cfg).eval().requires_grad_(False)
        torch.set_default_dtype(torch.float32)
    heads = ArmoHeads(HeadsConfig(attributes=tuple(f"a{i}" for i in range(K)), hidden_size=cfg.hidden_size,
                                  gating_hidden_dim=1024))  # fmt: skip
    backbone = Backbone(model=model, tokenizer=SimpleNamespace(pad_token_id=0), model_id="random-llama3-8b-shape"
                        if not tiny else "random-tiny-llama", device=device, dtype=dtype)  # fmt: skip
    config = ScorerConfig(max_tokens=8192, token_budget=token_budget, max_batch_size=256)
    return Scorer(backbone, heads, model_id=backbone.model_id, config=config)


def workload(n: int, vocab: int, tiny: bool, seed: int = 0) -> list[EncodedConversation]:
    """The reference script's make_workload: the same lengths and ids for the same seed."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (8, 64) if tiny else (64, 512)
    rlo, rhi = (8, 64) if tiny else (64, 1024)
    prompts = torch.randint(lo, hi, (n,), generator=g).tolist()
    responses = torch.randint(rlo, rhi, (n,), generator=g).tolist()
    out = []
    for pl, rl in zip(prompts, responses):
        ids = torch.randint(10, vocab - 10, (pl + rl,), generator=g).tolist()
        out.append(EncodedConversation(input_ids=tuple(ids), prompt_anchor=pl - 1, original_tokens=pl + rl, truncated=False))
    return out


def group_workload(groups: int, n: int, prompt_len: int, vocab: int, tiny: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    rlo, rhi = (8, 32) if tiny else (64, 512)
    out = []
    for _ in range(groups):
        prompt = torch.randint(10, vocab - 10, (prompt_len,), generator=g).tolist()
        for _ in range(n):
            rl = int(torch.randint(rlo, rhi, (1,), generator=g))
            ids = prompt + torch.randint(10, vocab - 10, (rl,), generator=g).tolist()
            out.append(EncodedConversation(input_ids=tuple(ids), prompt_anchor=prompt_len - 1, original_tokens=len(ids), truncated=False))
    return out


def flops(scorer: Scorer, encoded) -> float:
    model = scorer.backbone.model
    cfg = model.config
    params = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    return sum(2 * params * e.num_tokens + 2 * cfg.num_hidden_layers * e.num_tokens**2 * cfg.hidden_size for e in encoded)


def measure(name, scorer, encoded, peak, device, reference=None, extra=None, out=None):
    """Score once to warm up on a slice, then time the whole workload."""
    scorer.score_encoded(encoded[:2])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    results = scorer.score_encoded(encoded)
    sync(device)
    seconds = time.perf_counter() - start
    scores = [r.score for r in results]
    tokens = sum(e.num_tokens for e in encoded)
    row = {"kind": "mode", "mode": name, "conversations": len(encoded), "tokens": tokens, "seconds": round(seconds, 3),
           "tokens_per_s": round(tokens / seconds, 1), "mfu": round(flops(scorer, encoded) / seconds / peak, 4),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}  # fmt: skip
    if reference is not None:
        row["max_score_deviation"] = max(abs(a - b) for a, b in zip(scores, reference))
    row.update(extra or {})
    emit(row, out)
    return scores, row


def bitwise_invariant(scorer, encoded) -> bool:
    """A conversation's score in batch-invariant mode alone, among others, and reordered: bitwise equal."""
    target = encoded[0]
    alone = scorer.score_encoded([target])[0]
    mixes = [list(encoded[:6]), list(reversed(encoded[:6])), [encoded[5], target, encoded[3]]]
    for mix in mixes:
        for e, r in zip(mix, scorer.score_encoded(mix)):
            if e is target and (r.score, r.rewards, r.gating) != (alone.score, alone.rewards, alone.gating):
                return False
    return True


def quantized_copy(model, bits: int):
    """A bitsandbytes copy of `model` with every decoder Linear replaced (8-bit LLM.int8, or 4-bit nf4)."""
    import bitsandbytes as bnb

    q = copy.deepcopy(model)
    for module in list(q.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            weight = child.weight.data.to("cpu")
            if bits == 8:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=6.0)  # fmt: skip
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, quant_type="nf4")  # fmt: skip
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.data.to("cpu"), requires_grad=False)
            setattr(module, child_name, new.to(child.weight.device))
    return q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model on CPU (seconds)")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--group-n", type=int, default=8)
    parser.add_argument("--group-prompt", type=int, default=512)
    parser.add_argument("--skip-quantized", action="store_true")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = min(args.n, 8) if args.tiny else args.n
    emit(env_row(device), args.out)
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 512)
    emit({"kind": "matmul_peak", "tflops": round(peak / 1e12, 3), "dtype": str(dtype)}, args.out)

    scorer = build_scorer(args.tiny, device, dtype, args.token_budget)
    vocab = scorer.backbone.model.config.vocab_size
    encoded = workload(n, vocab, args.tiny)
    mode = lambda **c: scorer.with_config(ScorerConfig(**{**scorer.config.__dict__, **c}))  # noqa: E731

    one = mode(batch_invariant=True)
    reference, _ = measure("one_per_forward", one, encoded, peak, device, out=args.out,
                           extra={"bitwise_batch_invariant": bitwise_invariant(one, encoded)})  # fmt: skip
    measure("padded", mode(batch_plan="padded", share_prompts=False), encoded, peak, device, reference, out=args.out)
    measure("packed", mode(batch_plan="packed", share_prompts=False), encoded, peak, device, reference, out=args.out)

    groups = group_workload(2 if args.tiny else args.groups, 3 if args.tiny else args.group_n,
                            32 if args.tiny else args.group_prompt, vocab, args.tiny)  # fmt: skip
    flat_ref, flat = measure("groups_flat", mode(share_prompts=False), groups, peak, device, out=args.out)
    _, shared = measure("groups_shared", mode(share_prompts=True), groups, peak, device, flat_ref, out=args.out)
    emit({"kind": "ratio", "groups_shared_vs_flat": round(flat["seconds"] / shared["seconds"], 3)}, args.out)

    for bits, name in ((8, "int8"), (4, "nf4")):
        if args.skip_quantized:
            continue
        reason = None
        if device.type != "cuda":
            reason = "bitsandbytes needs a CUDA device"
        else:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                reason = "bitsandbytes is not installed (pip install bitsandbytes from a brought wheel)"
        if reason:
            emit({"kind": "mode", "mode": name, "skipped": reason}, args.out)
            continue
        try:
            q = scorer.with_config(replace_config(scorer.config, batch_plan="padded", share_prompts=False))
            q.backbone = copy.copy(scorer.backbone)
            q.backbone.model = quantized_copy(scorer.backbone.model, bits)
            measure(name, q, encoded, peak, device, reference, out=args.out)
            del q
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - report and go on: the other figures still count
            emit({"kind": "mode", "mode": name, "error": f"{type(exc).__name__}: {exc}"}, args.out)


def replace_config(config: ScorerConfig, **changes) -> ScorerConfig:
    from dataclasses import replace

    return replace(config, **changes)


if __name__ == "__main__":
    main()
