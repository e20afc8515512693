"""Admission control and the one batcher thread that owns the model.

Handler threads encode (tokenize) their requests, then `submit` them here and wait on a
`concurrent.futures.Future`. They never run the model: the Scorer is not thread-safe, and a model call
on a handler thread would let N clients run N forward passes at once on the same cores.

- Admission control bounds the tokens queued or computing (`max_tokens_in_flight`); over it, `submit`
  raises OverloadedError with a retry hint derived from the measured throughput.
- The batcher thread groups work from all clients until `token_budget` tokens or `max_wait_s` after the
  first item, then computes it per forward group (serving/models.py): the items of head sets on one backbone
  share one backbone forward, and each (model, steering weights) gets one heads call (the scorer length-sorts
  and splits into forward passes itself). Several served models share this one thread, budget and limit.
- Each item carries a deadline and a cancelled flag: dead items are dropped before compute, expired ones
  with DeadlineExceededError.
- Identical conversations within one scorer call are computed once.
- A group whose compute raises (e.g. out of memory) is split in halves and retried, so one bad request
  fails alone and its neighbours still get their scores.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import tracing
from ..config import Limits
from ..errors import DeadlineExceededError, InvalidInputError, NotReadyError, OverloadedError
from ..model.encoding import EncodedConversation
from ..types import AttributeWeights
from .backend import ScorerBackend
from .models import Job, ModelSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatcherConfig:
    """How the batcher groups work and how much it admits."""

    token_budget: int = 8192
    """Most tokens (sum over conversations) handed to the scorer in one call; a larger request goes alone."""
    max_wait_s: float = 0.003
    """How long the batcher waits for more work after the first item before computing a partial batch."""
    max_tokens_in_flight: int = Limits.max_tokens_in_flight
    """Admission control: most tokens queued or computing; beyond it, OverloadedError (RESOURCE_EXHAUSTED)."""
    max_items_per_batch: int = 512
    """Most requests grouped into one scorer call (bounds the work lost to a split-and-retry)."""

    def __post_init__(self) -> None:
        if self.token_budget < 1:
            raise InvalidInputError(f"token_budget must be >= 1, got {self.token_budget}", field="token_budget")
        if not 0 <= self.max_wait_s <= 1:
            raise InvalidInputError(f"max_wait_s must be in [0, 1], got {self.max_wait_s}", field="max_wait_s")
        if self.max_tokens_in_flight < 1:
            raise InvalidInputError(
                f"max_tokens_in_flight must be >= 1, got {self.max_tokens_in_flight}", field="max_tokens_in_flight"
            )
        if self.max_items_per_batch < 1:
            raise InvalidInputError(
                f"max_items_per_batch must be >= 1, got {self.max_items_per_batch}", field="max_items_per_batch"
            )


class BatchObserver(Protocol):
    """Hooks for metrics; called from the batcher thread (and `on_load` from handler threads too)."""

    def on_batch(self, conversations: int, tokens: int, seconds: float) -> None: ...

    def on_load(self, queue_depth: int, tokens_in_flight: int) -> None: ...

    def on_drop(self, reason: str) -> None: ...

    def on_split(self) -> None: ...


class _NullObserver:
    def on_batch(self, conversations: int, tokens: int, seconds: float) -> None:
        pass

    def on_load(self, queue_depth: int, tokens_in_flight: int) -> None:
        pass

    def on_drop(self, reason: str) -> None:
        pass

    def on_split(self) -> None:
        pass


@dataclass(eq=False)
class WorkItem:
    """One request's work: score several encoded conversations, or inspect one encoded prompt."""

    kind: str  # "score" | "inspect"
    encoded: tuple[EncodedConversation, ...]
    weights: AttributeWeights | None
    deadline: float | None  # time.monotonic() value; None = no deadline
    tokens: int
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"  # "cancelled" (the caller went away) or "deadline" (its deadline passed)
    model: str = ""  # the served model's name (ModelSet); "" only before submit resolves it
    trace: Any = field(default_factory=tracing.current)  # the submitting call's trace context (None: off)
    enqueued_ns: int = field(default_factory=time.time_ns)  # wall clock, for the queue-wait span

    def cancel(self, reason: str = "cancelled") -> None:
        """Mark the caller as gone (client cancelled, handler timed out): the batcher will skip the work.
        `reason` ("cancelled" or "deadline") labels the drop in the metrics; the first cancel wins."""
        if not self._cancelled.is_set():
            self.cancel_reason = reason
        self._cancelled.set()
        self.future.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set() or self.future.cancelled()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


_STOP = object()


class Batcher:
    """Owns the scorer: exactly one thread calls it."""

    def __init__(
        self, scorer: ScorerBackend | ModelSet, config: BatcherConfig = BatcherConfig(), observer: BatchObserver | None = None
    ):
        self.models = scorer if isinstance(scorer, ModelSet) else ModelSet.single(scorer)
        self.scorer = self.models.get(None)  # the default model
        self.config = config
        self.observer: BatchObserver = observer or _NullObserver()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._tokens_in_flight = 0
        self._queued_items = 0
        self._closed = False
        self._abandoned: str | None = None  # set by abandon(): the reason every remaining item fails with
        self._current: list[WorkItem] = []  # the items of the scorer call in progress (for abandon)
        self._throughput = 0.0  # tokens/s, exponential moving average over batches
        self._thread = threading.Thread(target=self._run, name="rewardsvc-batcher", daemon=True)
        self._started = False

    # ---- handler side ------------------------------------------------------------------------------

    def start(self) -> "Batcher":
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    @property
    def tokens_in_flight(self) -> int:
        return self._tokens_in_flight

    @property
    def queue_depth(self) -> int:
        return self._queued_items

    def retry_after_s(self) -> float:
        """Time to drain what is in flight at the measured throughput (before any batch: 100 ms)."""
        if self._throughput <= 0:
            return 0.1
        return min(10.0, max(0.01, self._tokens_in_flight / self._throughput))

    def submit_score(
        self,
        encoded: Sequence[EncodedConversation],
        weights: AttributeWeights | None = None,
        *,
        deadline: float | None = None,
        model: str | None = None,
    ) -> WorkItem:
        """`model`: a served model's name (None or "" = the default)."""
        tokens = sum(e.num_tokens for e in encoded)
        return self._submit(WorkItem("score", tuple(encoded), weights, deadline, tokens, model=self.models.resolve(model)))

    def submit_inspect(
        self, encoded: EncodedConversation, weights: AttributeWeights | None = None, *, deadline: float | None = None,
        model: str | None = None,
    ) -> WorkItem:
        return self._submit(WorkItem("inspect", (encoded,), weights, deadline, encoded.num_tokens, model=self.models.resolve(model)))

    def _submit(self, item: WorkItem) -> WorkItem:
        limit = self.config.max_tokens_in_flight
        if item.tokens > limit:
            # Waiting cannot help: say so instead of asking the client to retry forever.
            raise InvalidInputError(
                f"request: {item.tokens} tokens, over max_tokens_in_flight={limit}; split it into smaller requests",
                field="request",
            )
        with self._lock:
            if self._closed:
                raise NotReadyError("the server is shutting down; retry on another replica")
            if self._tokens_in_flight + item.tokens > limit:
                raise OverloadedError(
                    f"overloaded: {self._tokens_in_flight} tokens in flight, limit max_tokens_in_flight={limit}",
                    retry_after_s=self.retry_after_s(),
                )
            self._tokens_in_flight += item.tokens
            self._queued_items += 1
            self._queue.put(item)
        # Released however the item ends: result, error, cancellation or drop. Registered outside the lock:
        # if the batcher already finished the item, the callback runs here at once and takes the lock.
        item.future.add_done_callback(lambda _f, n=item.tokens: self._release(n))
        self.observer.on_load(self._queued_items, self._tokens_in_flight)
        return item

    def _release(self, tokens: int) -> None:
        with self._lock:
            self._tokens_in_flight -= tokens
        self.observer.on_load(self._queued_items, self._tokens_in_flight)

    def close(self, timeout: float | None = None) -> bool:
        """Stop admitting; finish everything already admitted (within `timeout`), then stop the thread.
        Returns False when the timeout passed first (what was left is failed with NotReadyError)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if not self._started:
            self._fail_queued()
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._fail_queued()
            return False
        return True

    def abandon(self, message: str = "the server shut down before this request was computed") -> None:
        """Stop admitting and give up on everything admitted: queued items and the items of the scorer call
        in progress fail at once with NotReadyError(message) (UNAVAILABLE, retryable). The scorer call in
        progress cannot be interrupted; the thread finishes it, discards its results, starts nothing new and
        exits. Join it with close(timeout)."""
        with self._lock:
            self._abandoned = message
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
            current = list(self._current)
        for item in current:
            self._set_exception(item, NotReadyError(message))
        self._fail_queued(message)
        self._queue.put(_STOP)  # _fail_queued may have taken the first one: the thread must still see a stop

    @property
    def thread_alive(self) -> bool:
        """Whether the batcher thread still runs (e.g. inside a scorer call after close() timed out)."""
        return self._thread.is_alive()

    def _fail_queued(self, message: str = "the server shut down before this request was computed") -> None:
        while True:
            item = self._take(0)
            if item is None:
                return
            if item is not _STOP:
                self._set_exception(item, NotReadyError(message))

    # ---- batcher thread ----------------------------------------------------------------------------

    def _take(self, block_s: float | None):
        """Next item from the queue (None on timeout)."""
        try:
            item = self._queue.get(timeout=block_s) if block_s is None or block_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if item is not _STOP:
            with self._lock:
                self._queued_items -= 1
        return item

    def _run(self) -> None:
        carry: deque[WorkItem] = deque()  # taken but did not fit the previous batch
        stopping = False
        while True:
            if carry:
                first = carry.popleft()
            elif stopping:
                return
            else:
                first = self._take(None)
            if first is _STOP:
                stopping = True
                continue
            batch, tokens = [first], first.tokens
            wait_until = time.monotonic() + self.config.max_wait_s
            while tokens < self.config.token_budget and len(batch) < self.config.max_items_per_batch:
                if carry:
                    item = carry.popleft()
                elif stopping:
                    break
                else:
                    item = self._take(wait_until - time.monotonic())
                    if item is None:
                        break
                if item is _STOP:
                    stopping = True  # finish what was admitted before the stop, then exit
                    continue
                if tokens + item.tokens > self.config.token_budget:
                    carry.appendleft(item)
                    break
                batch.append(item)
                tokens += item.tokens
            self.observer.on_load(self._queued_items, self._tokens_in_flight)
            with self._lock:
                self._current = batch
            try:
                self._process(batch)
            finally:
                with self._lock:
                    self._current = []

    def _process(self, batch: list[WorkItem]) -> None:
        groups: dict[Any, list[WorkItem]] = {}
        for item in batch:
            if item.kind == "inspect":
                self._inspect(item)
            else:
                groups.setdefault(self.models.forward_key(item.model), []).append(item)
        for items in groups.values():
            self._score(items)

    def _alive(self, items: list[WorkItem]) -> list[WorkItem]:
        """Drop cancelled and expired items right before compute (and every item once abandoned)."""
        now = time.monotonic()
        alive = []
        for item in items:
            if self._abandoned is not None:
                self._set_exception(item, NotReadyError(self._abandoned))
            elif item.cancelled:
                self.observer.on_drop("deadline" if item.cancel_reason == "deadline" else "cancelled")
                item.future.cancel()
            elif item.expired(now):
                self.observer.on_drop("deadline")
                waited_ms = (now - item.enqueued_at) * 1000
                self._set_exception(
                    item, DeadlineExceededError(f"deadline passed after {waited_ms:.0f} ms in the queue, before compute")
                )
            else:
                alive.append(item)
        return alive

    def _score(self, items: list[WorkItem]) -> None:
        items = self._alive(items)
        if not items:
            return
        conversations = sum(len(item.encoded) for item in items)
        tokens = sum(item.tokens for item in items)
        if tracing.enabled():
            taken_ns = time.time_ns()
            for item in items:
                tracing.record(tracing.QUEUE_WAIT, item.enqueued_ns, taken_ns, parent=item.trace)
        started = time.monotonic()
        try:
            # Identical conversations are computed once (GRPO groups repeat short completions; many clients send
            # the same probe; head sets on one backbone score the same rollouts). Scores do not depend on batch
            # neighbours, so sharing is exact.
            # One forward serves several calls: the span is the first call's child, linked to the others.
            with tracing.span(tracing.BATCH_FORWARD, parent=items[0].trace, links=[i.trace for i in items[1:]],
                              batch_size=conversations, tokens=tokens):  # fmt: skip
                results = self.models.score_jobs([Job(item.model, item.encoded, item.weights) for item in items])
        except Exception as exc:  # any failure: isolate the request that causes it
            self._after_failure(exc)
            if len(items) == 1:
                log.warning("event=batch.item_failed error=%r tokens=%d", exc, tokens)
                self._set_exception(items[0], exc)
                return
            log.warning("event=batch.split items=%d tokens=%d error=%r", len(items), tokens, exc)
            self.observer.on_split()
            middle = len(items) // 2
            self._score(items[:middle])
            self._score(items[middle:])
            return
        self._measured(conversations, tokens, time.monotonic() - started)
        for item, result in zip(items, results):
            self._set_result(item, result)

    def _inspect(self, item: WorkItem) -> None:
        if not self._alive([item]):
            return
        started = time.monotonic()
        try:
            result = self.models.get(item.model).inspect_encoded(item.encoded[0], item.weights)
        except Exception as exc:
            self._after_failure(exc)
            self._set_exception(item, exc)
            return
        self._measured(1, item.tokens, time.monotonic() - started)
        self._set_result(item, result)

    def _measured(self, conversations: int, tokens: int, seconds: float) -> None:
        if seconds > 0:
            rate = tokens / seconds
            self._throughput = rate if self._throughput <= 0 else 0.8 * self._throughput + 0.2 * rate
        self.observer.on_batch(conversations, tokens, seconds)

    @staticmethod
    def _after_failure(exc: BaseException) -> None:
        # After a CUDA out-of-memory error, cached blocks of the failed forward would make the retry of
        # the smaller halves fail too.
        if type(exc).__name__ == "OutOfMemoryError":
            try:
                import torch

                torch.cuda.empty_cache()
            except Exception:  # pragma: no cover - best effort
                pass

    @staticmethod
    def _set_result(item: WorkItem, result: Any) -> None:
        if not item.future.done():  # a cancelled future cannot take a result
            try:
                item.future.set_result(result)
            except Exception:  # pragma: no cover - raced with cancel
                pass

    @staticmethod
    def _set_exception(item: WorkItem, exc: BaseException) -> None:
        if not item.future.done():
            try:
                item.future.set_exception(exc)
            except Exception:  # pragma: no cover - raced with cancel
                pass
