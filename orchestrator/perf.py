"""Quick timing helpers: tokiwa's ``runPerformance`` and ``measurePerformance``.

* :func:`run_performance` calls a function once and returns its result with the time it took.
* :func:`measure_performance` calls it ``times`` times (default 10 000) and returns every
  call's time, with a summary (mean, median, p95, min, max).

Times are in milliseconds (``time_ms``, ``times_ms``), read from ``time.perf_counter_ns``.
The ``*_async`` variants await an ``async def`` function (or anything returning an
awaitable). These are for a quick look at a function's cost, in the REPL or a test; the
project's benchmarks (``benchmarks/``) are the measured numbers.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from orchestrator.callbacks import is_async_callable
from orchestrator.errors import InvalidArgumentError

T = TypeVar("T")

DEFAULT_TIMES = 10_000
_NS_PER_MS = 1_000_000


@dataclass(frozen=True, slots=True)
class Timing(Generic[T]):
    """One call: what it returned and how long it took (ms)."""

    result: T
    time_ms: float


@dataclass(frozen=True, slots=True)
class Measurements:
    """The time (ms) of each of ``count`` calls, in call order, and their summary."""

    times_ms: list[float]

    @property
    def count(self) -> int:
        return len(self.times_ms)

    @property
    def total_ms(self) -> float:
        return math.fsum(self.times_ms)

    @property
    def mean_ms(self) -> float:
        return self.total_ms / len(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p95_ms(self) -> float:
        """The 95th percentile (nearest rank)."""
        ordered = sorted(self.times_ms)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def max_ms(self) -> float:
        return max(self.times_ms)

    def summary(self) -> dict[str, float]:
        """count, total_ms, mean_ms, median_ms, p95_ms, min_ms and max_ms as a dict."""
        return {"count": self.count, "total_ms": self.total_ms, "mean_ms": self.mean_ms,
                "median_ms": self.median_ms, "p95_ms": self.p95_ms, "min_ms": self.min_ms,
                "max_ms": self.max_ms}


def _check(fn: Any, times: Any = 1, *, sync: bool) -> None:
    if not callable(fn):
        raise InvalidArgumentError(f"expected a function to time, got {fn!r}")
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise InvalidArgumentError(f"times must be an integer >= 1, got {times!r}")
    if sync and is_async_callable(fn):
        raise InvalidArgumentError(f"{getattr(fn, '__name__', fn)!r} is async: time it with "
                                   "await run_performance_async(fn) / measure_performance_async(fn)")


def _sync_result(fn: Callable[[], T]) -> T:
    result = fn()
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if callable(close):
            close()  # a coroutine never awaited would warn
        raise InvalidArgumentError(f"{getattr(fn, '__name__', fn)!r} returned an awaitable: time it with "
                                   "await run_performance_async(fn) / measure_performance_async(fn)")
    return result


def run_performance(fn: Callable[[], T]) -> Timing[T]:
    """Call ``fn()`` once; its result and the time the call took (ms)."""
    _check(fn, sync=True)
    start = time.perf_counter_ns()
    result = _sync_result(fn)
    return Timing(result, (time.perf_counter_ns() - start) / _NS_PER_MS)


def measure_performance(fn: Callable[[], Any], times: int = DEFAULT_TIMES) -> Measurements:
    """Call ``fn()`` ``times`` times; each call's time (ms), in order."""
    _check(fn, times, sync=True)
    clock = time.perf_counter_ns
    samples: list[float] = []
    for _ in range(times):
        start = clock()
        _sync_result(fn)
        samples.append((clock() - start) / _NS_PER_MS)
    return Measurements(samples)


async def run_performance_async(fn: Callable[[], Awaitable[T]]) -> Timing[T]:
    """Await ``fn()`` once; its result and the time it took (ms)."""
    _check(fn, sync=False)
    start = time.perf_counter_ns()
    result = await fn()
    return Timing(result, (time.perf_counter_ns() - start) / _NS_PER_MS)


async def measure_performance_async(fn: Callable[[], Awaitable[Any]], times: int = DEFAULT_TIMES) -> Measurements:
    """Await ``fn()`` ``times`` times; each call's time (ms), in order."""
    _check(fn, times, sync=False)
    clock = time.perf_counter_ns
    samples: list[float] = []
    for _ in range(times):
        start = clock()
        await fn()
        samples.append((clock() - start) / _NS_PER_MS)
    return Measurements(samples)
