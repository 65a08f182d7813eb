"""Calling user code that may be sync or async: handlers, hooks, filters, callbacks.

- :func:`is_async_callable`: calling it returns a coroutine (an ``async def`` function, a
  ``functools.partial`` of one, or an object whose class defines ``async def __call__``).
- :func:`resolve`: await a value if it is awaitable, else return it.
- :func:`call_and_await`: call in the event loop, then resolve the result (quick callbacks).
- :func:`call_in_thread`: run a sync callable in a worker thread (``asyncio.to_thread``, so
  context variables follow), then resolve the result in the loop.
- :func:`call_maybe_async`: await an async callable, run any other in a thread.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any


def is_async_callable(fn: Any) -> bool:
    """Whether calling ``fn`` returns a coroutine to await."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(type(fn), "__call__", None))  # noqa: B004 - callable objects with async __call__


async def resolve(value: Any) -> Any:
    """``value``, awaited first if it is awaitable."""
    if inspect.isawaitable(value):
        return await value
    return value


async def call_and_await(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` in the event loop; await its result if that is awaitable."""
    return await resolve(fn(*args, **kwargs))


async def call_in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` in a worker thread; await its result (in the loop) if that is awaitable."""
    return await resolve(await asyncio.to_thread(fn, *args, **kwargs))


async def call_maybe_async(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Await ``fn`` if it is async, else run it in a worker thread; await an awaitable result."""
    if is_async_callable(fn):
        return await fn(*args, **kwargs)
    return await call_in_thread(fn, *args, **kwargs)
