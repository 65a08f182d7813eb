"""run_performance / measure_performance (tokiwa's runPerformance / measurePerformance)."""

from __future__ import annotations

import asyncio
import time

import pytest

from orchestrator import measure_performance, run_performance
from orchestrator.errors import InvalidArgumentError
from orchestrator.perf import Measurements, measure_performance_async, run_performance_async


def test_run_performance_returns_the_result_and_the_time_the_call_took():
    timing = run_performance(lambda: (time.sleep(0.02), 42)[1])
    assert timing.result == 42
    assert 20.0 <= timing.time_ms < 1000.0


def test_measure_performance_times_each_call_in_order():
    calls: list[int] = []
    found = measure_performance(lambda: calls.append(len(calls)), times=50)
    assert calls == list(range(50))
    assert found.count == 50 and len(found.times_ms) == 50 and all(t >= 0 for t in found.times_ms)


def test_measure_performance_calls_ten_thousand_times_by_default():
    calls = [0]

    def tick() -> None:
        calls[0] += 1

    assert measure_performance(tick).count == 10_000 == calls[0]


def test_the_summary_is_computed_from_the_times():
    found = Measurements([4.0, 1.0, 3.0, 2.0, 10.0])
    assert found.summary() == {"count": 5, "total_ms": 20.0, "mean_ms": 4.0, "median_ms": 3.0,
                               "p95_ms": 10.0, "min_ms": 1.0, "max_ms": 10.0}


@pytest.mark.parametrize("times", [0, -1, 2.5, True])
def test_times_must_be_a_positive_integer(times):
    with pytest.raises(InvalidArgumentError, match="times must be an integer >= 1"):
        measure_performance(lambda: None, times=times)


def test_a_non_callable_is_refused():
    with pytest.raises(InvalidArgumentError, match="expected a function to time"):
        run_performance(42)  # type: ignore[arg-type]


def test_an_async_function_is_pointed_at_the_async_helpers():
    async def work() -> int:
        return 1

    with pytest.raises(InvalidArgumentError, match="is async: time it with await run_performance_async"):
        run_performance(work)
    with pytest.raises(InvalidArgumentError, match="returned an awaitable"):
        measure_performance(lambda: work(), times=1)


async def test_the_async_helpers_await_the_function():
    async def work() -> str:
        await asyncio.sleep(0.01)
        return "done"

    timing = await run_performance_async(work)
    assert timing.result == "done" and timing.time_ms >= 10.0
    found = await measure_performance_async(work, times=3)
    assert found.count == 3 and found.min_ms >= 10.0
