"""The models one server serves (`serve --model NAME=PATH`, repeatable), by name, and how one batch of work
for several of them is computed.

Head sets on one loaded backbone (the same Backbone object: same weights, same feature layer; the loader
shares it, see Scorer.load's `shared_backbones`) form one forward group: the batcher hands a group's work to
`score_jobs` at once, the backbone runs once over the union of the conversations, and each head set applies
its own heads to the rows it was asked for. Models on different backbones are separate groups, computed one
after the other by the one batcher thread under one token budget and one admission limit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInputError
from ..model.encoding import EncodedConversation
from ..types import AttributeWeights, ScoreResult
from .backend import ScorerBackend

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+\-/]{0,127}$")


@dataclass(frozen=True)
class Job:
    """One request's score work: which model, which encoded conversations, which steering."""

    model: str  # a canonical name (ModelSet.resolve)
    encoded: tuple[EncodedConversation, ...]
    weights: AttributeWeights | None


def weights_key(weights: AttributeWeights | None) -> Any:
    """Conversations are scored together only when steered the same way (score_encoded takes one weights)."""
    return None if weights is None else (weights.mode, tuple(sorted(weights.values.items())))


def shares_forward(backend: ScorerBackend) -> bool:
    """Whether a backend can take embeddings computed for another head set (a Scorer can; test doubles not)."""
    return hasattr(backend, "backbone") and callable(getattr(backend, "embed", None)) and callable(
        getattr(backend, "score_embedded", None)
    )


class ModelSet:
    """Served models by name, in the order given; the first is the default (requests with an empty `model`)."""

    def __init__(self, models: Sequence[tuple[str, ScorerBackend]], *, check_names: bool = True):
        if not models:
            raise InvalidInputError("serve needs at least one model", field="model")
        self._models: dict[str, ScorerBackend] = {}
        for name, backend in models:
            if check_names and not NAME.match(name):
                raise InvalidInputError(
                    f"--model: model name {name!r} must be 1-128 characters of letters, digits and ._:@+-/ "
                    "starting with a letter or digit",
                    field="model",
                )
            if name in self._models:
                raise InvalidInputError(f"--model: the model name {name!r} is given twice", field="model")
            self._models[name] = backend
        self.default = next(iter(self._models))

    @classmethod
    def single(cls, backend: ScorerBackend) -> "ModelSet":
        """One model, named by its model_id (what a server started with one `--model PATH` serves; whatever the
        id holds, requests may leave `model` empty)."""
        return cls([(getattr(backend, "model_id", "") or "default", backend)], check_names=False)

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def items(self) -> list[tuple[str, ScorerBackend]]:
        return list(self._models.items())

    def resolve(self, name: str | None) -> str:
        """The canonical name of a request's `model` ("" = the default); unknown -> INVALID_ARGUMENT."""
        if not name:
            return self.default
        if name not in self._models:
            raise InvalidInputError(
                f"model: unknown model {name!r}; this server serves {self.names} (GetModelInfo lists them)",
                field="model",
            )
        return name

    def get(self, name: str | None) -> ScorerBackend:
        return self._models[self.resolve(name)]

    def forward_key(self, name: str) -> Any:
        """Models with the same key share one backbone forward per batch."""
        backend = self._models[name]
        return ("backbone", id(backend.backbone)) if shares_forward(backend) else ("model", name)

    def describe(self) -> list[dict[str, Any]]:
        """Every served model for GetModelInfo.models and GET /v1/models: name, model_id, backbone, attributes,
        trained, is_default."""
        out = []
        for name, backend in self._models.items():
            info = backend.model_info()
            out.append({
                "name": name, "model_id": backend.model_id, "backbone": info.get("backbone", ""),
                "attributes": list(backend.attributes), "trained": bool(backend.trained), "is_default": name == self.default,
            })  # fmt: skip
        return out

    # ---- the batcher thread only -------------------------------------------------------------------

    def score_jobs(self, jobs: Sequence[Job]) -> list[list[ScoreResult]]:
        """Results per job, in order. All jobs must share one forward_key (the batcher groups them so).
        Identical conversations are computed once: across the whole group for a shared backbone, within each
        (model, weights) call otherwise."""
        calls: dict[tuple[str, Any], list[int]] = {}  # (model, weights) -> job indices
        for i, job in enumerate(jobs):
            calls.setdefault((job.model, weights_key(job.weights)), []).append(i)
        first = self._models[jobs[0].model]
        embeddings, rows = None, {}
        if shares_forward(first) and len({job.model for job in jobs}) > 1:
            # One backbone forward for every head set of the group.
            unique = list(dict.fromkeys(e for job in jobs for e in job.encoded))
            rows = {e: i for i, e in enumerate(unique)}
            embeddings = first.embed(unique)
        results: list[list[ScoreResult]] = [[] for _ in jobs]
        for (model, _), indices in calls.items():
            backend, weights = self._models[model], jobs[indices[0]].weights
            encoded = [e for i in indices for e in jobs[i].encoded]
            unique = list(dict.fromkeys(encoded))
            if embeddings is None:
                computed = backend.score_encoded(unique, weights)
            else:
                if weights is not None:
                    weights.check_attributes(backend.attributes)
                computed = backend.score_embedded(unique, embeddings.rows([rows[e] for e in unique]), weights)
            by_input = dict(zip(unique, computed))
            for i in indices:
                results[i] = [by_input[e] for e in jobs[i].encoded]
        return results
