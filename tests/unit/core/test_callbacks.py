"""Calling user code that may be sync or async (orchestrator.callbacks)."""

from __future__ import annotations

import asyncio
import functools
import threading

from orchestrator.callbacks import (
    call_and_await,
    call_in_thread,
    call_maybe_async,
    is_async_callable,
    resolve,
)


async def coro_fn(x):
    return x


class AsyncCallable:
    async def __call__(self, x):
        return x


def test_async_functions_partials_and_objects_with_async_call_are_async():
    assert is_async_callable(coro_fn)
    assert is_async_callable(functools.partial(coro_fn, 1))
    assert is_async_callable(AsyncCallable())
    assert is_async_callable(AsyncCallable().__call__)


def test_sync_functions_and_classes_are_not_async():
    assert not is_async_callable(lambda x: x)
    assert not is_async_callable(AsyncCallable)  # calling the class builds an instance
    assert not is_async_callable(print)


async def test_resolve_awaits_awaitables_only():
    assert await resolve(3) == 3
    assert await resolve(coro_fn(4)) == 4
    future = asyncio.get_running_loop().create_future()
    future.set_result(5)
    assert await resolve(future) == 5


async def test_call_and_await_runs_in_the_loop_thread():
    def sync(x):
        return threading.get_ident(), x

    assert await call_and_await(sync, 1) == (threading.get_ident(), 1)
    assert await call_and_await(coro_fn, 2) == 2
    assert await call_and_await(lambda: coro_fn(3)) == 3  # a sync callable returning a coroutine


async def test_sync_code_runs_in_a_thread_and_its_awaitable_result_is_awaited():
    def sync(x, *, y):
        return threading.get_ident(), x + y

    ident, value = await call_in_thread(sync, 1, y=2)
    assert ident != threading.get_ident() and value == 3
    assert await call_in_thread(lambda: coro_fn(6)) == 6
    ident, value = await call_maybe_async(sync, 1, y=1)
    assert ident != threading.get_ident() and value == 2
    assert await call_maybe_async(AsyncCallable(), 7) == 7
