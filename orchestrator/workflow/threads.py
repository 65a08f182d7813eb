"""Sync handlers in daemon threads, stopped when the node is cancelled.

Python cannot kill a thread. :func:`run_in_thread` runs ``fn`` in a daemon thread of a small
pool (idle threads are reused, and exit after :data:`IDLE_S` seconds without work) and, when
the task awaiting it is cancelled (fail-fast, ``Runner.cancel``, Ctrl+C, a node or run
timeout):

1. stops waiting at once: the run settles without waiting for the thread, and the thread
   never keeps the process alive (it is a daemon);
2. after :data:`INTERRUPT_GRACE_S` (0.2 s, in which a node that watches ``ctx.signal`` may
   end by itself), raises :class:`NodeInterrupted` inside the thread (CPython's
   ``PyThreadState_SetAsyncExc``). Python code sees it at its next bytecode, so a loop of
   ``time.sleep(0.05)`` stops within about a quarter of a second; ``finally`` blocks and ``with`` exits run as
   for any exception. ``NodeInterrupted`` derives from ``BaseException``, like
   ``KeyboardInterrupt``, so ``except Exception:`` in the handler does not swallow it.

A thread blocked in C code (one long ``time.sleep``, a socket read without a timeout, a C
extension) sees the exception only when it returns to Python; until then it goes on in the
background (the pool no longer counts it as free), and whatever it returns is dropped. Code
that must not be cut halfway should check ``ctx.signal`` instead and run with
``Runner(executor=...)``, whose threads are never interrupted.

The pool has no size limit (the Runner's ``concurrency`` bounds how many nodes run at once),
so an abandoned thread never delays the next node.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from orchestrator.callbacks import resolve

__all__ = ["NodeInterrupted", "run_in_thread"]

IDLE_S = 30.0  # an idle pool thread exits after this long without a call
INTERRUPT_GRACE_S = 0.2  # a cancelled call may end by itself this long before it is interrupted

_SET_ASYNC_EXC = ctypes.pythonapi.PyThreadState_SetAsyncExc
_SET_ASYNC_EXC.argtypes = (ctypes.c_ulong, ctypes.py_object)
_SET_ASYNC_EXC.restype = ctypes.c_int
_LAND_S = 1.0  # how long a finished call waits for an exception sent just as it ended


class NodeInterrupted(BaseException):
    """Raised inside a sync handler's thread when its node was cancelled or timed out."""


class _Call:
    """One call: the thread's side (run) and the loop's side (interrupt), guarded by one lock.

    The async exception is sent only while the call is ``running``, and at most once; before
    the thread leaves the call it waits (a few bytecodes) for a sent exception to land, so it
    can never hit the pool's code, a later call, or another thread that reuses the ident. (A
    pending exception is never cleared with ``PyThreadState_SetAsyncExc(id, NULL)``: on
    CPython 3.11 that call made later thread starts hang under cProfile.)"""

    __slots__ = ("fn", "args", "kwargs", "context", "loop", "future", "lock", "state", "cancelled", "ident",
                 "sent", "received")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 loop: asyncio.AbstractEventLoop, future: asyncio.Future[tuple[bool, Any]]) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.context = contextvars.copy_context()
        self.loop, self.future = loop, future
        self.lock = threading.Lock()
        self.state = "new"  # new -> running -> done
        self.cancelled = False
        self.ident = 0
        self.sent = False      # NodeInterrupted was sent to the thread
        self.received = False  # ... and has been raised there

    # -- the thread
    def run(self) -> None:
        outcome: tuple[bool, Any] | None = None
        stage = 0
        while True:  # NodeInterrupted is raised at most once; every stage below is resumable
            try:
                if stage == 0:
                    stage = 1
                    if not self._start():
                        return
                    outcome = self._invoke()
                stage = 2
                self._finish()
                if outcome is not None:
                    self._deliver(outcome)
                return
            except NodeInterrupted:
                self.received = True
                outcome = None  # nobody waits for the outcome any more

    def _start(self) -> bool:
        with self.lock:
            if self.cancelled:
                self.state = "done"
                return False
            self.ident = threading.get_ident()
            self.state = "running"
            return True

    def _invoke(self) -> tuple[bool, Any] | None:
        try:
            return True, self.context.run(self.fn, *self.args, **self.kwargs)
        except NodeInterrupted:
            self.received = True
            return None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task as is
            return False, exc

    def _finish(self) -> None:
        with self.lock:
            self.state = "done"
            waiting = self.sent and not self.received
        if waiting:  # sent just as the call ended: let it land here, inside run()'s loop
            deadline = time.monotonic() + _LAND_S
            while not self.received and time.monotonic() < deadline:
                time.sleep(0.0005)  # the exception lands at the next call

    def _deliver(self, outcome: tuple[bool, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, outcome)
        except RuntimeError:
            pass  # the loop is closed: the run is over

    # -- the event loop
    def interrupt(self) -> None:
        with self.lock:
            if self.cancelled:
                return
            self.cancelled = True
            if self.state == "running":
                self.sent = _SET_ASYNC_EXC(self.ident, NodeInterrupted) == 1


def _settle(future: asyncio.Future[tuple[bool, Any]], outcome: tuple[bool, Any]) -> None:
    if not future.done():
        future.set_result(outcome)


class _Pool:
    """Daemon threads waiting for calls. A thread is free only between calls: one that is
    still in an interrupted call (blocked in C code) is simply not in ``_idle``."""

    def __init__(self, idle_s: float = IDLE_S) -> None:
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._count = 0

    def submit(self, call: _Call) -> None:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                self._count += 1
                number = self._count
        if worker is None:
            worker = _Worker(self, number)
            worker.calls.put(call)
            worker.start()
        else:
            worker.calls.put(call)

    def _park(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def _retire(self, worker: _Worker) -> bool:
        """True if ``worker`` may exit (nobody picked it while it timed out)."""
        with self._lock:
            if worker in self._idle:
                self._idle.remove(worker)
                return True
            return False


class _Worker(threading.Thread):
    def __init__(self, pool: _Pool, number: int) -> None:
        super().__init__(name=f"tokiwa-node-{number}", daemon=True)
        self.pool = pool
        self.calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            try:
                call = self.calls.get(timeout=self.pool.idle_s)
            except queue.Empty:
                if self.pool._retire(self):
                    return
                continue  # picked just as it timed out: its call is on the way
            call.run()
            self.pool._park(self)


_POOL = _Pool()


async def run_in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in a pool thread (context variables follow) and
    return its result (awaited if it is awaitable); cancelling the caller interrupts it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
    call = _Call(fn, args, kwargs, loop, future)
    _POOL.submit(call)
    try:
        ok, value = await future
    except asyncio.CancelledError:
        # a node that watches ctx.signal (set before its task is cancelled) may end by itself:
        # it gets INTERRUPT_GRACE_S to, then the exception is sent (a timer thread: the event
        # loop may be gone by then)
        timer = threading.Timer(INTERRUPT_GRACE_S, call.interrupt)
        timer.daemon = True
        timer.start()
        raise
    if ok:
        return await resolve(value)
    try:
        raise value
    finally:
        del value
