"""Running a chatflow: one conversation at a time, in stream order, with fenced memory.

``ChatflowExecutor.run(workflow, conversation_id=..., event=...)`` does, in order:

1. refuse a blank conversation id (InvalidArgumentError: a chatflow needs one);
2. **wait for its turn**: the publish script RPUSHes each chatflow event's stream id to
   ``keys.conversation_order(cid)`` atomically with the XADD. If this event's stream id is in
   that list, wait (async polling with backoff, never blocking the worker's other events)
   until it is the head. An id not in the list does not wait (best effort: a producer that
   could not compute the conversation id, or a redelivery after the turn was done). After
   ``order_wait_timeout_s`` the run starts anyway, with a warning, so that a lost head entry
   cannot stall a conversation forever;
3. take the conversation lock (:func:`orchestrator.locks.conversation_lock`), waiting
   asynchronously up to ``lock_wait_timeout_s`` (LockError after that); the lock is renewed
   in the background while the run lasts;
4. load the memory, merge the ``memory`` option over it (shallow), run the workflow. If the
   lock is **lost** meanwhile (a renewal finds the token changed or the key gone, or no
   renewal confirmed it for a whole lease: a frozen worker resuming), the run is cancelled
   at once, from the lock's loss callback: the run's signal is set and its running node
   tasks are cancelled before they take another step (sync nodes see ``ctx.signal``; their
   threads cannot be interrupted). Such a run saves nothing, ends ``cancelled`` with a
   ``FencingError``, and is redone like a fenced-out one (below);
5. save the resulting memory, **even when the run failed** (as tokiwa does), as a delta
   keyed by the event id (a redelivered event never applies twice) and fenced by the lock's
   epoch: a holder whose lock expired and was taken since is refused (FencingError), and the
   run is then reported ``failed`` with that error;
6. release the lock and remove the stream id from the order list (also on failure; not on
   cancellation, so that a worker shutting down hands the event back with its turn intact,
   and not when the run ended with a FencingError, whose event is redone: see
   :func:`will_be_redone`). :meth:`ChatflowExecutor.abandon` removes an id for the
   dead-letter path.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from orchestrator.chat.conversations import ConversationStore, check_memory, shallow_diff
from orchestrator.errors import FencingError, InvalidArgumentError, describe_error
from orchestrator.events import check_conversation_id
from orchestrator.keys import Keys
from orchestrator.locks import RedisLock, check_lease, conversation_lock
from orchestrator.workflow.result import RunStatus, WorkflowRunResult

log = logging.getLogger(__name__)

# polling bounds while waiting for a conversation turn (seconds)
_ORDER_POLL_MIN_S = 0.002
_ORDER_POLL_MAX_S = 0.1


def _honour_lost_cancel(cancels: int) -> None:
    """Raise CancelledError if this task was asked to stop since it had ``cancels`` pending
    cancellations but none reached us. Python 3.11's ``asyncio.wait_for``, which redis-py uses
    to send every command, drops a cancellation that lands just as the send completes (the
    request stays counted in ``Task.cancelling()``). The consumer cancels a run whose entry
    another worker took; a lost cancellation would let that run take the lock and run again
    once the turn opens. Checked before each step that starts work."""
    task = asyncio.current_task()
    if task is not None and task.cancelling() > cancels:
        log.info("chatflow: a cancellation of this run was lost inside the Redis client; stopping now")
        raise asyncio.CancelledError()


def will_be_redone(result: Any) -> bool:
    """Whether a run's event is to be redone rather than settled: its memory write was fenced
    out, or its lock was lost during the run (the executor then keeps the ``FencingError`` as
    the result's ``exception``). The workflow registry leaves such an event pending (its
    verdict is ``FENCED_OUT``), so the run keeps its turn."""
    return isinstance(getattr(result, "exception", None), FencingError)


class ChatflowExecutor:
    """Runs chatflows of many conversations concurrently, each conversation serialized.

    ``runner`` is an :class:`orchestrator.workflow.runner.Runner` (anything with
    ``await run(workflow, run_id=..., **options)`` returning a result with ``.memory`` and
    ``.status``, and ``cancel(run_id, reason)`` that aborts a running run at once).
    Defaults: lock lease 30 s renewed every 10 s (a killed worker's conversation is free
    again within 30 s); lock wait 60 s; order wait 120 s (longer than a redelivery takes).
    """

    def __init__(self, redis: Any, keys: Keys, store: ConversationStore, runner: Any, *,
                 lock_ttl_ms: int = 30_000, lock_renew_ms: int | None = None,
                 lock_wait_timeout_s: float | None = 60.0, order_wait_timeout_s: float = 120.0,
                 poll_min_s: float = _ORDER_POLL_MIN_S, poll_max_s: float = _ORDER_POLL_MAX_S) -> None:
        if not 0 < poll_min_s <= poll_max_s:
            raise InvalidArgumentError("need 0 < poll_min_s <= poll_max_s")
        if not callable(getattr(runner, "cancel", None)):
            raise InvalidArgumentError("a chatflow runner needs cancel(run_id, reason): a run whose "
                                       "conversation lock is lost must be stopped")
        self.redis, self.keys, self.store, self.runner = redis, keys, store, runner
        self.lock_options = {"ttl_ms": lock_ttl_ms, "renew_ms": lock_renew_ms,
                             "wait_timeout_s": lock_wait_timeout_s}
        check_lease(lock_ttl_ms, lock_renew_ms)  # bad lease settings fail now, not per run
        self.order_wait_timeout_s = order_wait_timeout_s
        # conversation -> event set when a turn ends in this process, and its waiter count
        self._turn_events: dict[str, asyncio.Event] = {}
        self._turn_waiters: dict[str, int] = {}
        self.poll_min_s, self.poll_max_s = poll_min_s, poll_max_s
        #: first deliveries that were in no order list (published without the conversation key)
        self.unordered = 0
        self.on_unordered: Callable[[], Any] | None = None

    async def run(self, workflow: Any, *, conversation_id: str | None, event: Any = None,
                  stream_id: str | None = None, input: Any = None, context: Any = None,  # noqa: A002
                  memory: dict[str, Any] | None = None, **runner_kwargs: Any) -> Any:
        """Run ``workflow`` for one conversation (see the module docstring); returns the
        runner's result with the saved memory."""
        conversation_id = check_conversation_id(conversation_id, chatflow=str(getattr(workflow, "name", workflow)))
        if memory is not None and not isinstance(memory, dict):
            raise InvalidArgumentError(f"memory must be a dict, got {type(memory).__name__}")
        cid = conversation_id
        stream_id = stream_id or getattr(event, "stream_id", None)
        group = getattr(event, "group", None)
        partition = getattr(event, "partition", 0)
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        if stream_id:
            in_order = await self.wait_turn(cid, stream_id, group, partition)
            if in_order is None and group is not None and getattr(event, "deliveries", 0) <= 1:
                self._unordered(cid, stream_id)
        finished = False
        try:
            _honour_lost_cancel(cancels)
            lock = conversation_lock(self.redis, self.keys, cid, **self.lock_options)
            queue_get = getattr(self.store, "queue_get", None)  # memory read with the lock's take
            await lock.acquire(reads=None if queue_get is None else lambda pipe: queue_get(pipe, cid))
            try:
                _honour_lost_cancel(cancels)
                result = await self._run_locked(workflow, lock, cid, event, input, context, memory,
                                                runner_kwargs, cancels)
            finally:
                await asyncio.shield(lock.release())
            finished = not will_be_redone(result)  # a run to be redone keeps its turn
            return result
        except asyncio.CancelledError:
            raise
        except BaseException:
            finished = True
            raise
        finally:
            if stream_id and finished:
                await asyncio.shield(self.abandon(cid, stream_id, group, partition))

    async def _run_locked(self, workflow: Any, lock: RedisLock, cid: str, event: Any, input: Any,  # noqa: A002
                          context: Any, memory: dict[str, Any] | None, runner_kwargs: dict[str, Any],
                          cancels: int = 0) -> Any:
        token = lock.fencing_token
        run_id = runner_kwargs.pop("run_id", None) or str(uuid.uuid4())

        def stop_run(reason: str) -> None:
            # synchronous, from the lock's watchdog or renewal: the node tasks are cancelled
            # before any of them takes another step (Runner.cancel sets the signal and cancels
            # them); a run not started yet is never started (checked below)
            log.warning("chatflow run %s of conversation %r: conversation lock lost (%s); cancelling "
                        "the run, its event will be redone", run_id, cid, reason)
            self.runner.cancel(run_id, f"conversation lock lost: {reason}")

        forget = lock.on_lost(stop_run)
        try:
            if lock.reads_at_acquire is not None:  # a store with queue_get (see run)
                store: Any = self.store
                stored = store.memory_from(lock.reads_at_acquire)
            else:
                stored = await self.store.get(cid)
            _honour_lost_cancel(cancels)
            if lock.lost:  # lost while the memory loaded: do not start
                return self._lock_lost(self._unstarted(workflow, run_id, cid, stored), lock, cid, stored)
            # no await between the check above and Runner.run registering the run, so a loss
            # from here on finds the run to cancel
            try:
                result = await self.runner.run(workflow, input=input, context=context, event=event,
                                               conversation_id=cid, memory={**stored, **(memory or {})},
                                               run_id=run_id, **runner_kwargs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                partial = getattr(exc, "result", None)  # a run timeout carries its partial result
                if partial is not None and isinstance(getattr(partial, "memory", None), dict):
                    if lock.lost:
                        return self._lock_lost(partial, lock, cid, stored)
                    await self._save(partial, cid, event, token, stored)
                raise
        finally:
            forget()
        if lock.lost:  # a run whose lock is gone writes nothing; the fence would refuse it anyway
            return self._lock_lost(result, lock, cid, stored)
        await self._save(result, cid, event, token, stored, lock)
        return result

    @staticmethod
    def _unstarted(workflow: Any, run_id: str, cid: str, stored: dict[str, Any]) -> WorkflowRunResult:
        now = time.time()
        return WorkflowRunResult(run_id=run_id, workflow_id=getattr(workflow, "id", ""),
                                 workflow_name=getattr(workflow, "name", str(workflow)),
                                 workflow_type=getattr(workflow, "type", "chatflow"), started_at=now,
                                 finished_at=now, duration_ms=0.0, conversation_id=cid, memory=dict(stored))

    @staticmethod
    def _lock_lost(result: Any, lock: RedisLock, cid: str, stored: dict[str, Any]) -> Any:
        """Report a run whose lock was lost: ``cancelled`` with a FencingError (so its event is
        redone), and the memory it started from (it saved nothing)."""
        exc = FencingError(f"conversation {cid!r}: the conversation lock was lost during the run "
                           f"({lock.lost_reason}); the run was cancelled and saved nothing", name=lock.key)
        result.status = RunStatus.CANCELLED
        result.error, result.exception = describe_error(exc), exc
        result.memory = dict(stored)
        return result

    async def _write(self, cid: str, stored: dict[str, Any], memory: dict[str, Any], token: int | None,
                     event_id: str | None, lock: RedisLock | None = None) -> Any:
        """Save the run's memory; with ``lock`` and a store that can (Redis), release the lock
        in the same script as the write (the run's last step: one round trip)."""
        apply_delta = getattr(self.store, "apply_delta", None)
        if apply_delta is None:
            return await self.store.set(cid, memory, fencing_token=token, event_id=event_id)
        patch = shallow_diff(stored, check_memory(memory))  # we hold the lock: what we loaded is current
        if lock is not None and getattr(self.store, "releases_lock", False):
            holder = await lock.hand_over()
            if holder is not None:
                return await apply_delta(cid, patch, event_id=event_id, fencing_token=token,
                                         release=(lock.key, holder))
        return await apply_delta(cid, patch, event_id=event_id, fencing_token=token)

    async def _save(self, result: Any, cid: str, event: Any, token: int | None,
                    stored: dict[str, Any], lock: RedisLock | None = None) -> None:
        memory = result.memory if isinstance(result.memory, dict) else {}
        event_id = getattr(event, "id", None)
        try:
            applied = await asyncio.shield(self._write(cid, stored, memory, token, event_id, lock))
        except FencingError as exc:
            log.warning("chatflow %s of conversation %r: memory refused: %s",
                        getattr(result, "run_id", "?"), cid, exc)
            result.status = RunStatus.FAILED
            result.error, result.exception = describe_error(exc), exc
            result.memory = await self.store.get(cid)
            return
        if not applied:
            log.info("conversation %r: event %s was already applied; memory unchanged", cid, event_id)
            result.memory = await self.store.get(cid)

    def _unordered(self, cid: str, stream_id: str) -> None:
        """A first delivery whose id is in no order list: its publisher did not know the
        conversation key (a raw XADD, or a key computed by code the publisher lacks), so its
        order among the conversation's events is not known. Counted, and logged at the first
        and every 1000th."""
        self.unordered += 1
        if self.on_unordered is not None:
            self.on_unordered()
        if self.unordered % 1000 == 1:
            log.warning("conversation %r: event %s was published without its conversation order (its "
                        "publisher could not compute the conversation key); it runs when it is read "
                        "(%d such events so far)", cid, stream_id, self.unordered)

    async def wait_turn(self, conversation_id: str, stream_id: str, group: str | None = None,
                        partition: int = 0) -> bool | None:
        """Wait until ``stream_id`` heads the conversation's order list (of the chatflow route
        ``group``, in the stream ``partition`` the entry is in). Returns True when it is its turn, None when the id is not in the list at
        the first look (not recorded, or its turn is over), False if it gave up after
        ``order_wait_timeout_s``."""
        key = self.keys.conversation_order(conversation_id, group, partition)
        deadline = time.monotonic() + self.order_wait_timeout_s
        delay = self.poll_min_s
        first = True
        while True:
            pos = await self.redis.lpos(key, stream_id)
            if pos is None and first:
                return None
            first = False
            if pos is None or int(pos) == 0:
                return True
            if time.monotonic() >= deadline:
                log.warning("conversation %r: %s waited %.0f s behind %d earlier events; running anyway",
                            conversation_id, stream_id, self.order_wait_timeout_s, int(pos))
                return False
            if await self._turn_changed(conversation_id, delay):
                delay = self.poll_min_s  # a turn ended here: look again at once
            else:
                delay = min(delay * 1.5, self.poll_max_s)

    async def _turn_changed(self, conversation_id: str, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, waking early when a turn of this conversation ends in this
        process (the next event is usually waiting here too). Polling covers other hosts."""
        changed = self._turn_events.get(conversation_id)
        if changed is None:
            changed = self._turn_events[conversation_id] = asyncio.Event()
        self._turn_waiters[conversation_id] = self._turn_waiters.get(conversation_id, 0) + 1
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: 3.11's can lose a cancellation
                await changed.wait()
            return True
        except TimeoutError:
            return False
        finally:
            left = self._turn_waiters[conversation_id] - 1
            if left:
                self._turn_waiters[conversation_id] = left
            else:  # nobody waits on this conversation here: forget it (bounded memory)
                del self._turn_waiters[conversation_id]
                self._turn_events.pop(conversation_id, None)

    async def abandon(self, conversation_id: str, stream_id: str, group: str | None = None,
                      partition: int = 0) -> None:
        """Give up the turn of ``stream_id`` (done, dead-lettered, or not for this chatflow) in
        the order list of the chatflow route ``group`` (in ``partition``), so the next event runs."""
        await self.redis.lrem(self.keys.conversation_order(conversation_id, group, partition), 1, stream_id)
        changed = self._turn_events.pop(conversation_id, None)
        if changed is not None:  # wake this process's waiters; later ones get a fresh event
            changed.set()
