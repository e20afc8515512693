"""Where the batch commands' scores come from: the model loaded in this process, or a running service
(`--server HOST:PORT`). Both answer the same two calls, with a per-conversation error instead of an
exception when one conversation of a batch cannot be scored, so one bad row never sinks its neighbours.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any, Protocol

from ..config import Limits
from ..errors import InvalidInputError, RewardError
from ..model.conversation import Messages
from ..normalization import Normalization, steering_conflict
from ..types import AttributeWeights, ScoreResult

TOKEN_ENV = "REWARDSVC_AUTH_TOKEN"  # the same variable `rewardsvc serve` reads

Outcome = ScoreResult | RewardError


class ScoreSource(Protocol):
    """What the batch pipelines score through (not to be confused with serving.backend.ScorerBackend, the model
    behind a server)."""

    def score(self, conversations: Sequence[Messages]) -> list[Outcome]: ...

    def score_group(self, prompt: Messages, responses: Sequence[str]) -> list[Outcome]: ...

    def close(self) -> None: ...


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("remote scoring (instead of loading the model here)")
    g.add_argument("--server", metavar="HOST:PORT", help="score through a running `rewardsvc serve` at this address")
    g.add_argument("--auth-token-file", dest="client_token_file", metavar="FILE",
                   help=f"file holding the server's bearer token (or set ${TOKEN_ENV})")  # fmt: skip
    g.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    g.add_argument("--tls-ca", metavar="PEM", help="PEM CA bundle that signed the server certificate (implies --tls)")
    g.add_argument("--tls-cert", dest="client_tls_cert", metavar="PEM", help="PEM client certificate, for mutual TLS (implies --tls)")
    g.add_argument("--tls-key", dest="client_tls_key", metavar="PEM", help="PEM private key of --tls-cert")
    g.add_argument("--tls-server-name", metavar="NAME", help="name to check the server certificate against (default: HOST)")
    g.add_argument("--timeout", type=float, metavar="SECONDS", default=300.0, help="seconds per request, retries included (default %(default)s)")


def _split_each(score_many, conversations: Sequence[Any]) -> list[Outcome]:
    """Score a batch; if the batch is refused as invalid, score each alone so the error lands on its row."""
    try:
        return list(score_many(conversations))
    except InvalidInputError as exc:
        if len(conversations) == 1:
            return [exc]
    out: list[Outcome] = []
    for c in conversations:
        try:
            out.extend(score_many([c]))
        except InvalidInputError as exc:
            out.append(exc)
    return out


class LocalSource:
    """The model in this process (torch). With a normalization, results carry z-scores against the scorer's
    calibration (the same statistics and code path as a server's)."""

    def __init__(self, scorer, weights: AttributeWeights | None, normalization: Normalization | None = None):
        self.scorer, self.weights = scorer, weights
        self.normalization = normalization if normalization is not None and normalization.enabled else None
        if self.normalization is not None:
            steering_conflict(self.normalization, weights)
            if scorer.calibration is None:
                raise InvalidInputError(f"--normalize: model {scorer.model_id} has no calibration ({scorer.calibration_note})",
                                        field="normalize")  # fmt: skip

    def _normalized(self, outcomes: list[Outcome]) -> list[Outcome]:
        if self.normalization is None:
            return outcomes
        return [self.scorer.calibration.normalize(o, self.normalization) if isinstance(o, ScoreResult) else o for o in outcomes]

    def score(self, conversations: Sequence[Messages]) -> list[Outcome]:
        encoded: list[Any] = []
        out: list[Any] = []
        for i, c in enumerate(conversations):
            try:
                encoded.append(self.scorer.encoder.encode(c, f"conversations[{i}]"))
                out.append(None)
            except InvalidInputError as exc:  # too long, bad conversation: this row only
                out.append(exc)
        results = iter(self.scorer.score_encoded(encoded, self.weights))
        return self._normalized([next(results) if o is None else o for o in out])

    def score_group(self, prompt: Messages, responses: Sequence[str]) -> list[Outcome]:
        # The library raises the typed error of the first bad response; _split_each finds every bad one.
        return self._normalized(_split_each(lambda rs: self.scorer.score_group(prompt, rs, self.weights), responses))

    def close(self) -> None:
        pass


class ServerSource:
    """A running service, through rewardsvc.client.RewardClient (retries, deadlines, TLS, token)."""

    def __init__(self, client, weights: AttributeWeights | None, batch: int = Limits.max_conversations_per_request,
                 normalization: Normalization | None = None):  # fmt: skip
        self.client, self.weights, self.batch = client, weights, batch
        self.normalization = normalization  # None: the server's default

    def score(self, conversations: Sequence[Messages]) -> list[Outcome]:
        out: list[Outcome] = []
        for start in range(0, len(conversations), self.batch):
            part = conversations[start : start + self.batch]
            out += _split_each(lambda cs: self.client.score(cs, self.weights, normalization=self.normalization), part)
        return out

    def score_group(self, prompt: Messages, responses: Sequence[str]) -> list[Outcome]:
        return _split_each(
            lambda rs: self.client.score_group(prompt, rs, self.weights, normalization=self.normalization).results, responses
        )

    def close(self) -> None:
        self.client.close()


def _read_token(path: str | None) -> str | None:
    if path:
        try:
            token = open(path, encoding="utf-8").read().strip()
        except OSError as exc:
            raise InvalidInputError(f"--auth-token-file: cannot read {path}: {exc}", field="auth_token_file") from exc
        if not token:
            raise InvalidInputError(f"--auth-token-file: {path} is empty", field="auth_token_file")
        return token
    return os.environ.get(TOKEN_ENV) or None  # never a flag value: flags show up in `ps`


def connect(args: argparse.Namespace):
    """A RewardClient for `--server`, checked first (health, then GetModelInfo, which needs the token) so a
    wrong address, certificate or token fails in seconds with one line naming the flag."""
    from ..client import ClientTLS, RewardClient
    from ..errors import UnauthenticatedError

    if ":" not in args.server:
        raise InvalidInputError(f"--server must be HOST:PORT, got {args.server!r}", field="server")
    tls: bool | ClientTLS = False
    if args.tls or args.tls_ca or args.client_tls_cert or args.tls_server_name:
        if bool(args.client_tls_cert) != bool(args.client_tls_key):
            raise InvalidInputError("--tls-cert and --tls-key go together (mutual TLS)", field="tls_cert")
        tls = ClientTLS(root_certificates=args.tls_ca, certificate_chain=args.client_tls_cert,
                        private_key=args.client_tls_key, server_name=args.tls_server_name)  # fmt: skip
    client = RewardClient(args.server, token=_read_token(args.client_token_file), tls=tls, timeout=args.timeout)
    try:
        status = client.health(timeout=min(args.timeout, 10.0))
        if status != "SERVING":
            raise RewardError(f"health is {status}, not SERVING")
        client.model_info(timeout=min(args.timeout, 10.0))
    except UnauthenticatedError as exc:
        client.close()
        raise RewardError(f"--server {args.server}: {exc} (give the token with --auth-token-file or ${TOKEN_ENV})") from exc
    except RewardError as exc:
        client.close()
        raise RewardError(f"--server {args.server}: not reachable or refused: {exc}") from exc
    return client


def open_score_source(
    args: argparse.Namespace, weights: AttributeWeights | None, normalization: Normalization | None = None
) -> tuple[ScoreSource, str]:
    """(the score source, a short description for the summary line). normalization: None = raw locally, the server's
    default with --server."""
    if args.server:
        if args.model or args.backbone or args.adapter:
            raise InvalidInputError("--model, --backbone and --adapter choose a local model; with --server the "
                                    "server's own model scores (drop them or drop --server)", field="server")  # fmt: skip
        client = connect(args)
        if weights is not None:
            weights.check_attributes(tuple(client.model_info()["attributes"]))
        return ServerSource(client, weights, normalization=normalization), f"server {args.server}"
    from .main import load_scorer

    scorer = load_scorer(args)
    if weights is not None:
        weights.check_attributes(scorer.attributes)
    return LocalSource(scorer, weights, normalization), scorer.model_id
