"""ServerConfig: network, limits, batching, security and shutdown of one server. Plain Python (no grpc), so that
`rewardsvc serve --help` can show the defaults without loading the server."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Limits
from ..errors import InvalidInputError
from ..integrations.openrlhf import ScoresMapping
from ..types import AttributeWeights
from ..normalization import RAW, Normalization
from .batching import BatcherConfig


@dataclass(frozen=True)
class ServerConfig:
    """Network, limits, batching, security and shutdown of one server."""

    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 (or ::) to listen on every interface."""
    port: int = 50051
    """gRPC port; 0 = an ephemeral port (see RunningServer.port)."""
    metrics_port: int | None = None
    """Prometheus /metrics HTTP port on the same host; None = off, 0 = ephemeral."""
    http_port: int | None = None
    """HTTP/JSON port (OpenRLHF's POST /get_reward, /v1/score, ...; serving/http.py); None = off, 0 = ephemeral."""
    http_policy_template: str | None = None
    """Tokenizer (directory or hub id) whose chat template OpenRLHF's `query` strings are rendered in;
    None = the reward backbone's own."""
    http_default_weights: AttributeWeights | None = None
    """Steering of the HTTP protocols whose requests cannot carry weights (OpenRLHF's /get_reward, vLLM's
    /classify and /pooling): one deployment, one steering. None = the gating's own weights."""
    openrlhf_scores: ScoresMapping = ScoresMapping()
    """How /get_reward's `scores` (OpenRLHF's dynamic-filtering signal, in [0, 1]) derive from the reward."""
    http_encode_threads: int = 4
    """Threads that parse, template and encode HTTP requests off the event loop (the tokenizer runs under one
    lock, so a few suffice)."""
    max_message_bytes: int = Limits.max_message_bytes
    """A limit: meaning and default in config.Limits (so for the other Limits fields below)."""
    max_conversations_per_request: int = Limits.max_conversations_per_request
    """A limit (config.Limits)."""
    max_tokens_per_conversation: int | None = None
    """Most tokens per templated conversation; None = the scorer's own max_tokens."""
    max_group_size: int = Limits.max_group_size
    """A limit (config.Limits)."""
    token_budget: int = BatcherConfig.token_budget
    """Most tokens the batcher hands to the scorer in one call."""
    max_wait_ms: float = BatcherConfig.max_wait_s * 1000.0
    """How long the batcher waits for more requests after the first before computing."""
    max_tokens_in_flight: int = Limits.max_tokens_in_flight
    """A limit (config.Limits): the batcher's admission control."""
    handler_threads: int = 64
    """gRPC handler threads (they only translate, encode and wait; one thread per concurrent call)."""
    auth_token: str | None = field(default=None, repr=False)
    """If set, every RewardService call needs `authorization: Bearer <token>` metadata."""
    tls_cert: str | None = None
    """PEM server certificate chain; with tls_key, the server speaks TLS only."""
    tls_key: str | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: str | None = None
    """PEM CA bundle; if set, clients must present a certificate it signed (mutual TLS)."""
    grace_s: float = 30.0
    """On shutdown, how long in-flight calls may take to finish before they are cancelled."""
    max_connection_age_s: float | None = None
    """If set, each client connection is sent GOAWAY after about this long (gRPC adds +-10 % jitter); calls in
    progress finish on it, the client reconnects for the next call and, with a dns:/// target, re-resolves, so
    replicas added by an autoscaler get traffic from clients already connected. None = connections live on."""
    normalize: bool = False
    """Default for requests that name no `normalization`: z-score the score and rewards against the model's
    calibration (`rewardsvc calibrate`); raw values stay in every response. Needs a calibrated model."""
    normalize_clip: float | None = None
    """With normalize: clip the default's z-scores to [-clip, clip]; None = no clip."""

    def __post_init__(self) -> None:
        def bad(name: str, message: str) -> None:
            raise InvalidInputError(f"server.{name} {message}", field=f"server.{name}")

        if not self.host:
            bad("host", "must be a non-empty address")
        if not 0 <= self.port <= 65535:
            bad("port", f"must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            bad("metrics_port", f"must be None or in [0, 65535], got {self.metrics_port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            bad("http_port", f"must be None or in [0, 65535], got {self.http_port}")
        if self.http_port is not None and self.tls_cert:
            bad("http_port", "is plain HTTP and would bypass the gRPC port's TLS; put a TLS proxy in front of it instead")
        for name in ("max_message_bytes", "max_conversations_per_request", "max_group_size", "token_budget",
                     "max_tokens_in_flight", "handler_threads", "http_encode_threads"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_per_conversation is not None and self.max_tokens_per_conversation < 2:
            bad("max_tokens_per_conversation", f"must be None or >= 2, got {self.max_tokens_per_conversation}")
        if not 0 <= self.max_wait_ms <= 1000:
            bad("max_wait_ms", f"must be in [0, 1000], got {self.max_wait_ms}")
        if self.grace_s < 0:
            bad("grace_s", f"must be >= 0, got {self.grace_s}")
        if self.max_connection_age_s is not None and not self.max_connection_age_s >= 1:
            bad("max_connection_age_s", f"must be None or >= 1 second, got {self.max_connection_age_s}")
        if self.auth_token is not None and not self.auth_token.strip():
            bad("auth_token", "must be None or a non-empty token")
        if bool(self.tls_cert) != bool(self.tls_key):
            bad("tls_cert", "and server.tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            bad("tls_client_ca", "needs server.tls_cert and server.tls_key (mutual TLS is TLS first)")
        if self.normalize and self.http_default_weights is not None:
            bad("normalize", "and server.http_default_weights cannot be combined: the calibration measures the gating's "
                "score, not a steered one (see docs/SERVING.md, Reward normalization)")
        if self.normalize_clip is not None:
            if not self.normalize:
                bad("normalize_clip", "needs server.normalize (a clip applies to the default's z-scores)")
            if not self.normalize_clip > 0 or self.normalize_clip == float("inf"):
                bad("normalize_clip", f"must be None or a finite number > 0, got {self.normalize_clip}")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def batcher_config(self) -> BatcherConfig:
        return BatcherConfig(
            token_budget=self.token_budget,
            max_wait_s=self.max_wait_ms / 1000.0,
            max_tokens_in_flight=self.max_tokens_in_flight,
        )

    def default_normalization(self) -> Normalization:
        return Normalization(mode="zscore", clip=self.normalize_clip) if self.normalize else RAW

    def limits(self) -> Limits:
        return Limits(
            max_message_bytes=self.max_message_bytes,
            max_conversations_per_request=self.max_conversations_per_request,
            max_group_size=self.max_group_size,
            max_tokens_in_flight=self.max_tokens_in_flight,
        )
