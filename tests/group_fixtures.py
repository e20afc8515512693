"""A GRPO-like group (one prompt, responses of varied length) and a counter of how often its prompt runs,
shared by the shared-prompt tests of model/ and serving/."""

from __future__ import annotations

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I sort a list in Python?"}]
RESPONSES = [
    "Use sorted(items).",
    "items.sort() sorts in place; sorted(items) returns a new list.",
    "I cannot help with that request.",
    "The capital of France is Paris.",
    "Use sorted(items) or items.sort(), " + "and keep the old promise " * 6,
]


class PromptCounter:
    """Counts the rows the backbone's embedding layer sees that start with `prefix` (a forward hook on the
    real model): how often the prompt's tokens actually run."""

    def __init__(self, scorer, prefix):
        self.prefix = list(prefix)
        self.rows = 0
        self.handle = scorer.backbone.model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        n = len(self.prefix)
        self.rows += sum(row[:n].tolist() == self.prefix for row in args[0])

    def close(self):
        self.handle.remove()
