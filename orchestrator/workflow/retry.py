"""Retry policies: how often a failed node is tried again and how long to wait in between.

Delay after failed attempt ``k`` (1-based), before jitter, capped at ``max_delay_s``:

* ``fixed``:       ``initial_delay_s``
* ``exponential``: ``initial_delay_s * multiplier ** (k - 1)``   (tokiwa's default curve)
* ``linear``:      ``initial_delay_s + increment_s * (k - 1)``

Jitter spreads retries of many runs so they do not hit a recovering service together:
``full`` draws uniformly from ``[0, delay]``, ``equal`` from ``[delay / 2, delay]``
(the AWS "exponential backoff and jitter" variants). Jitter never exceeds the cap.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from orchestrator.errors import InvalidArgumentError, UnsafePathError, WorkflowAborted

BACKOFFS = ("fixed", "exponential", "linear")
JITTERS = ("none", "full", "equal")
_DEFAULT_RNG = random.Random()


def _number(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(f"RetryPolicy.{name} must be a finite number, got {value!r}")
    if value < minimum:
        raise InvalidArgumentError(f"RetryPolicy.{name} must be >= {minimum}, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how a failing node is retried; validated when it is built.

    ``retry_on`` lists the retryable exception types (or their class names as strings, for
    declarative files); any other error fails the node at once. ``WorkflowAborted``, a
    refused path (``UnsafePathError``: trying again cannot help) and cancellation are never
    retried. ``max_attempts`` counts the first try: 3 means two retries.
    """

    max_attempts: int = 1
    backoff: Literal["fixed", "exponential", "linear"] = "exponential"
    initial_delay_s: float = 1.0
    multiplier: float = 2.0
    max_delay_s: float = 30.0
    increment_s: float | None = None
    jitter: Literal["none", "full", "equal"] = "none"
    retry_on: tuple[type[BaseException] | str, ...] = field(default=(Exception,))

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise InvalidArgumentError(f"RetryPolicy.max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if self.backoff not in BACKOFFS:
            raise InvalidArgumentError(f"RetryPolicy.backoff must be one of {BACKOFFS}, got {self.backoff!r}")
        if self.jitter not in JITTERS:
            raise InvalidArgumentError(f"RetryPolicy.jitter must be one of {JITTERS}, got {self.jitter!r}")
        object.__setattr__(self, "initial_delay_s", _number("initial_delay_s", self.initial_delay_s, 0))
        object.__setattr__(self, "multiplier", _number("multiplier", self.multiplier, 1))
        object.__setattr__(self, "max_delay_s", _number("max_delay_s", self.max_delay_s, 0))
        increment = self.initial_delay_s if self.increment_s is None else self.increment_s
        object.__setattr__(self, "increment_s", _number("increment_s", increment, 0))
        retry_on = self.retry_on
        if isinstance(retry_on, (type, str)):
            retry_on = (retry_on,)
        retry_on = tuple(retry_on)
        for item in retry_on:
            if not (isinstance(item, str) and item) and not (
                    isinstance(item, type) and issubclass(item, BaseException)):
                raise InvalidArgumentError(
                    f"RetryPolicy.retry_on must hold exception types or class names, got {item!r}")
        object.__setattr__(self, "retry_on", retry_on)

    def delay_for(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one."""
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise InvalidArgumentError(f"attempt must be an integer >= 1, got {attempt!r}")
        if self.backoff == "fixed":
            delay = self.initial_delay_s
        elif self.backoff == "linear":
            delay = self.initial_delay_s + cast(float, self.increment_s) * (attempt - 1)  # set by __post_init__
        else:
            exponent = min(attempt - 1, 1024)  # avoid float overflow; the cap applies anyway
            try:
                delay = self.initial_delay_s * self.multiplier ** exponent
            except OverflowError:
                delay = math.inf
        delay = min(delay, self.max_delay_s)
        if self.jitter == "full":
            delay = (rng or _DEFAULT_RNG).uniform(0.0, delay)
        elif self.jitter == "equal":
            delay = delay / 2 + (rng or _DEFAULT_RNG).uniform(0.0, delay / 2)
        return delay

    def is_retryable(self, error: BaseException) -> bool:
        """Whether ``error`` is of a retryable kind (ignoring how many attempts are left)."""
        if isinstance(error, (WorkflowAborted, UnsafePathError, asyncio.CancelledError)):
            return False
        for item in self.retry_on:
            if isinstance(item, str):
                if any(cls.__name__ == item for cls in type(error).__mro__):
                    return True
            elif isinstance(error, item):
                return True
        return False

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether failed attempt ``attempt`` should be followed by another one."""
        return attempt < self.max_attempts and self.is_retryable(error)


NO_RETRY = RetryPolicy()
