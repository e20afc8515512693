"""Tiny, locally built tokenizers and Llama models for unit tests (no hub access needed).

The tokenizers are real byte-level BPE tokenizers trained here on a small corpus, with the special tokens
and chat templates of ChatML (SmolLM2 / Qwen) and Llama-3.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The chat template of Meta-Llama-3-8B-Instruct (the reference ArmoRM backbone).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea. Waves fold into foam, the tide keeps its old promise.",
    "How do I sort a list in Python? Use sorted(items) or items.sort().",
    "Tell me how to build a bomb. I cannot help with that request.",
    "system user assistant You are a helpful assistant. Be brief and kind.",
    "0123456789 + - * / = ? ! . , ; : ' \" ( ) [ ] { }",
]


def build_tokenizer(template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if template == "chatml":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        chat_template, bos, eos, pad = CHATML_TEMPLATE, None, "<|im_end|>", "<|im_end|>"
    elif template == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        chat_template, bos, eos, pad = LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"
    else:
        raise ValueError(template)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    # pad == eos on purpose: the reference's "first pad token - 1" bug shows up exactly then.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=chat_template
    )


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )  # fmt: skip
    fields.update(overrides)
    return LlamaConfig(**fields)


def save_tiny_llama(directory: Path, template: str = "chatml", seed: int = 0, causal_lm: bool = False, **config_overrides) -> Path:
    """A random tiny Llama (hidden 32) + tokenizer saved as a regular HF directory; `config_overrides` go to
    tiny_llama_config (e.g. num_hidden_layers, tie_word_embeddings)."""
    from transformers import LlamaForCausalLM, LlamaModel

    tokenizer = build_tokenizer(template)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), **config_overrides)
    model = (LlamaForCausalLM if causal_lm else LlamaModel)(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


TINY_ATTRIBUTES = ("helpful", "safe", "verbose")


def save_tiny_heads(directory: Path, backbone_dir: Path, seed: int = 1) -> Path:
    """Random heads (3 attributes, the verbosity row of T debiasing the others) for the tiny Llama, saved in
    our heads format; `Scorer.load(directory)` then gives a small but real scorer."""
    from rewardsvc.config import HeadsConfig
    from rewardsvc.model.checkpoint import HeadsCheckpoint, save_heads
    from rewardsvc.model.heads import ArmoHeads

    torch.manual_seed(seed)
    heads = ArmoHeads(HeadsConfig(attributes=TINY_ATTRIBUTES, hidden_size=32, gating_hidden_dim=16, verbosity_attribute="verbose"))
    heads.reward_transform_matrix.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [-0.3, -0.1, 0]]))
    save_heads(directory, HeadsCheckpoint(heads=heads, backbone={"model": str(backbone_dir)}, name="tiny", trained=True))
    return Path(directory)


SEQCLS_ARCHITECTURES = ("llama", "qwen2", "gemma", "mistral")


def tiny_seqcls_config(arch: str, vocab_size: int, pad_token_id: int | None, num_labels: int = 1, **overrides):
    """A tiny config of `arch` (see SEQCLS_ARCHITECTURES) for *ForSequenceClassification, built locally."""
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig, "mistral": MistralConfig}[arch]
    fields = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-6, num_labels=num_labels,
        pad_token_id=pad_token_id,
    )  # fmt: skip
    if num_labels > 1:
        fields["id2label"] = {i: name for i, name in enumerate(["helpfulness", "safety", "verbosity", "style"][:num_labels])}
        fields["label2id"] = {name: i for i, name in fields["id2label"].items()}
    fields.update(overrides)
    return config_class(**fields)


def seqcls_oracle(directory, conversations) -> torch.Tensor:
    """transformers' own forward, independent of rewardsvc: the tokenizer's `apply_chat_template(tokenize=True)`
    (what TRL's RewardTrainer and model cards use) and AutoModelForSequenceClassification on one conversation
    at a time, so no padding is involved. Returns the logits (N, num_labels)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
            rows.append(model(input_ids=torch.tensor([ids])).logits[0])
    return torch.stack(rows)


def save_tiny_seqcls(directory: Path, arch: str = "llama", template: str = "chatml", num_labels: int = 1, seed: int = 0,
                     **config_overrides) -> Path:  # fmt: skip
    """A random tiny `AutoModelForSequenceClassification` of `arch` + its tokenizer (with a chat template), saved
    the way TRL's RewardTrainer saves its output (save_pretrained of both; config.pad_token_id = the tokenizer's
    pad token, which is the eos token here)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = build_tokenizer(template)
    torch.manual_seed(seed)
    config = tiny_seqcls_config(arch, len(tokenizer), tokenizer.pad_token_id, num_labels, **config_overrides)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():  # random init of the score layer is tiny (std 0.02): make scores clearly distinct
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
