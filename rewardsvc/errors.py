"""Typed errors of rewardsvc and the one table that maps them to gRPC status codes.

The core never imports grpc: the table holds status-code *names*; the servicer turns them into
`grpc.StatusCode[name]`. Every message names the field, key or limit involved.
"""

from __future__ import annotations


class RewardError(Exception):
    """Base class of every error rewardsvc raises on purpose."""


class InvalidInputError(RewardError, ValueError):
    """A request or input row is malformed; the message names the field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidConversationError(InvalidInputError):
    """A conversation (OpenAI-style message list) is malformed."""


class ConversationTooLongError(InvalidInputError):
    """A conversation has more tokens than the configured limit and truncation is off (or cannot help)."""

    def __init__(self, message: str, num_tokens: int, limit: int, field: str | None = None):
        super().__init__(message, field=field)
        self.num_tokens = num_tokens
        self.limit = limit


class BackboneError(RewardError):
    """The backbone (model or tokenizer) cannot be loaded or used as asked."""


class CheckpointError(RewardError):
    """A checkpoint is missing files or keys, or holds tensors of the wrong shape."""


class OverloadedError(RewardError):
    """Admission control refused the work; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 0.1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(RewardError):
    """The service is starting or shutting down."""


class DeadlineExceededError(RewardError):
    """The caller's deadline passed before the work was computed."""


class NonFiniteResultError(RewardError):
    """A computed result holds inf or NaN. Never sent as a score: not in the table below, so INTERNAL
    (with an error id; the details are logged)."""


class UnauthenticatedError(RewardError):
    """A call lacked valid credentials."""


# Ordered: the first matching class wins, so subclasses come before their bases.
GRPC_STATUS_BY_ERROR: tuple[tuple[type[BaseException], str], ...] = (
    (InvalidInputError, "INVALID_ARGUMENT"),
    (OverloadedError, "RESOURCE_EXHAUSTED"),
    (NotReadyError, "UNAVAILABLE"),
    (DeadlineExceededError, "DEADLINE_EXCEEDED"),
    (UnauthenticatedError, "UNAUTHENTICATED"),
    (CheckpointError, "FAILED_PRECONDITION"),
    (BackboneError, "FAILED_PRECONDITION"),
)


def grpc_status_name(error: BaseException) -> str:
    """Name of the gRPC status code for `error`; anything unexpected is INTERNAL (and must be logged)."""
    for error_type, name in GRPC_STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return name
    return "INTERNAL"
