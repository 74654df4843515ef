"""Retrying a generation the server refused before admitting it.

A replica that is draining answers a new stream with ``UNAVAILABLE`` before any response; one
whose queue is full answers ``RESOURCE_EXHAUSTED`` with a ``grpc-retry-pushback-ms`` hint. No step
has run in either case, so the call may simply be made again (here, or on another replica behind
a balancer). :class:`RetryPolicy` says how often and how long to wait; a failure after the server
sent ``Accepted`` is never retried (it is raised, and says how many steps had run).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple, TypeVar

import grpc

from . import errors

__all__ = ["RetryPolicy", "RETRYABLE_CODES", "PUSHBACK_KEY", "pushback_ms"]

logger = logging.getLogger(__name__)

#: The codes a refused generation ends with: a draining replica, a full queue.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

#: gRPC's retry pushback: trailing metadata, milliseconds to wait (a negative or unparsable value:
#: do not retry).
PUSHBACK_KEY = "grpc-retry-pushback-ms"

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How a :class:`~stepstream.RemotePipeline` retries a generation the server refused before
    admitting it (``UNAVAILABLE`` or ``RESOURCE_EXHAUSTED`` before ``Accepted``; a ``Queued``
    event before the refusal does not count as admission).

    ``max_attempts``: attempts in all, the first included (``1``: never retry).
    ``initial_backoff`` / ``multiplier`` / ``max_backoff``: seconds to wait before retry ``n``
    (1-based): ``min(initial_backoff * multiplier ** (n - 1), max_backoff)``, less a random part
    of up to ``jitter`` of it (``jitter=0.2``: between 80 % and 100 % of it).
    A ``grpc-retry-pushback-ms`` trailer overrides the backoff: a non-negative value is waited
    exactly (and the exponential backoff starts again from ``initial_backoff``), a negative or
    unparsable one means the server asks not to retry, and the error is raised at once.
    The call's own ``timeout`` bounds everything: a wait that would end past it is not started,
    and the last error is raised instead.
    ``sleep``: how to wait (seconds); ``random``: a number in [0, 1) for the jitter. Both are here
    so that tests can observe the waits; leave them as they are otherwise.

    Each retry is logged at DEBUG level on the ``stepstream.retry`` logger.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self):
        if int(self.max_attempts) != self.max_attempts or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, not {self.max_attempts!r}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("initial_backoff and max_backoff must be >= 0 seconds")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, not {self.multiplier!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], not {self.jitter!r}")

    def backoff(self, n: int) -> float:
        """The wait before retry ``n`` (1-based) without jitter, in seconds."""
        return min(self.initial_backoff * self.multiplier ** (n - 1), self.max_backoff)

    def delay(self, n: int) -> float:
        """The wait before retry ``n`` (1-based), jitter included, in seconds."""
        b = self.backoff(n)
        return b * (1.0 - self.jitter * self.random())


#: What a pipeline uses when given no policy: 5 attempts, 50 ms doubling up to 2 s.
DEFAULT_RETRY = RetryPolicy()

#: Client-side size limits also end a call with RESOURCE_EXHAUSTED; trying again cannot help.
_LOCAL_LIMIT = ("message larger than max",)


def pushback_ms(metadata: Optional[Sequence[Tuple[str, object]]]) -> Optional[int]:
    """The server's ``grpc-retry-pushback-ms`` in trailing metadata: milliseconds (>= 0), ``-1``
    when present but negative or unparsable (do not retry), ``None`` when absent."""
    for key, value in metadata or ():
        if key.lower() != PUSHBACK_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        try:
            ms = int(str(value).strip())
        except ValueError:
            return -1
        return ms if ms >= 0 else -1
    return None


def retryable(err: errors.StatusError) -> bool:
    """Whether ``err`` is a refusal before admission that may be retried."""
    if not getattr(err, "_before_admission", False) or err.code not in RETRYABLE_CODES:
        return False
    if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(s in (err.details or "") for s in _LOCAL_LIMIT):
        return False
    return True


def call(policy: Optional[RetryPolicy], attempt: Callable[[Optional[float]], T], deadline: Optional[float],
         what: str) -> T:
    """Runs ``attempt(timeout)`` until it returns, retrying the refusals ``policy`` allows.

    ``deadline``: the call's end on :func:`time.monotonic` (``None``: none); each attempt gets the
    seconds left as its timeout. ``attempt`` raises :class:`~stepstream.errors.StatusError`; the
    one it raised last is raised, with ``attempts`` set and the count in its message when more
    than one attempt was made."""
    policy = policy or RetryPolicy(max_attempts=1)
    n = 0  # exponential backoff step, reset by a pushback
    attempts = 0
    while True:
        attempts += 1
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return attempt(timeout)
        except errors.StatusError as err:
            err.attempts = attempts
            if not retryable(err):
                if attempts > 1:
                    errors.annotate(err, note=f"after {attempts} attempts")
                raise
            push = pushback_ms(err.trailing_metadata)
            if push is not None and push < 0:
                errors.annotate(err, note=f"not retried: the server's {PUSHBACK_KEY} says not to"
                                + (f"; after {attempts} attempts" if attempts > 1 else ""))
                raise
            if attempts >= policy.max_attempts:
                if attempts > 1:
                    errors.annotate(err, note=f"gave up after {attempts} attempts")
                raise
            if push is not None:
                wait, n = push / 1000.0, 0
            else:
                n += 1
                wait = policy.delay(n)
            if deadline is not None and time.monotonic() + wait >= deadline:
                errors.annotate(err, note=f"not retried: a {wait:.3g} s wait would pass the call's timeout; "
                                f"after {attempts} attempt{'s' if attempts > 1 else ''}")
                raise
            logger.debug(
                "%s refused before admission (%s: %s), attempt %d of %d; retrying in %.3f s%s",
                what, err.code.name, err.details, attempts, policy.max_attempts, wait,
                f" ({PUSHBACK_KEY}={push})" if push is not None else "",
            )
            policy.sleep(wait)
