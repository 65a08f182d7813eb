"""A Redis lease lock with fencing tokens and background renewal.

``RedisLock`` is the primitive under conversation locks (and, through the same scripts,
leader election in :mod:`orchestrator.leader`):

- acquire: one Lua script does ``SET key token NX PX ttl`` and, on success, ``INCR`` of the
  lock's epoch key. The new epoch is the **fencing token**: it grows with every acquisition,
  so a writer can prove it is the newest holder (stores refuse writes with an older token).
- renew: compare-and-extend (``PEXPIRE`` only while the value is still our token).
- release: compare-and-delete. Nothing is ever done by "check, then act" from Python.

While held, a renewal task owned by the lock extends the lease every ``renew_ms``. If a
renewal finds another holder, or no renewal has succeeded for a whole ``ttl_ms`` (Redis
unreachable), the lock is **lost**: ``lost`` turns True and ``lost_event`` is set, so the
work it protected can stop; its writes would be refused by fencing anyway.

Scenario for the defaults: a chatflow run that takes 5 minutes keeps its 30 s lease by
renewing every 10 s; if its worker is SIGKILLed, the lease expires within 30 s and the
conversation's next run (the redelivered event) can take it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from .errors import InvalidArgumentError, LockError
from .keys import Keys

log = logging.getLogger(__name__)

# KEYS[1] = lock key, KEYS[2] = epoch key
# ARGV[1] = holder token, ARGV[2] = ttl ms
# Takes the lock if it is free (or already ours: a new term); returns the new epoch
# (fencing token), or 0 when another holder has it.
ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])
"""

# KEYS[1] = lock key
# ARGV[1] = holder token, ARGV[2] = ttl ms
# Extends the lease only while the value is ARGV[1]; returns 1 if extended, 0 if not ours.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] = lock key
# ARGV[1] = holder token
# Deletes the lock only while the value is ARGV[1]; returns 1 if deleted, 0 if not ours.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Retry delay bounds while waiting for a held lock (seconds): starts small so that a
# conversation's next run starts right after the previous one releases.
_RETRY_MIN_S = 0.005
_RETRY_MAX_S = 0.2


def new_token() -> str:
    """A holder token no other process will ever use."""
    return uuid.uuid4().hex


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task we own and wait for it; re-raises only if *we* are being cancelled."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        log.exception("task %s failed while stopping", task.get_name())


def check_lease(ttl_ms: int, renew_ms: int | None) -> int:
    """Validate a lease's TTL and renewal period; returns the renewal period (default ttl/3)."""
    if not isinstance(ttl_ms, int) or ttl_ms < 10:
        raise InvalidArgumentError(f"ttl_ms must be an integer >= 10, got {ttl_ms!r}")
    renew = ttl_ms // 3 if renew_ms is None else renew_ms
    if not isinstance(renew, int) or not 1 <= renew < ttl_ms:
        raise InvalidArgumentError(f"renew_ms must be an integer in [1, ttl_ms), got {renew_ms!r}")
    return renew


class RedisLock:
    """A lease on ``key`` with a fencing epoch in ``epoch_key``.

    Use as ``async with lock:`` (acquire waits up to ``wait_timeout_s``) or call
    :meth:`acquire` / :meth:`release`. One instance is one acquisition at a time.
    """

    def __init__(self, redis: Any, key: str, epoch_key: str, *, ttl_ms: int = 30_000,
                 renew_ms: int | None = None, wait_timeout_s: float | None = 60.0,
                 token: str | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.key = key
        self.epoch_key = epoch_key
        self.ttl_ms = ttl_ms
        self.renew_ms = check_lease(ttl_ms, renew_ms)
        self.wait_timeout_s = wait_timeout_s
        self.token = token or new_token()
        self.fencing_token: int | None = None
        self.lost_event = asyncio.Event()
        self._monotonic = monotonic
        self._renewed_at = 0.0
        self._renewer: asyncio.Task[None] | None = None
        self._acquire = redis.register_script(ACQUIRE)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)

    def __repr__(self) -> str:
        return f"RedisLock({self.key!r}, token={self.fencing_token})"

    @property
    def owned(self) -> bool:
        """Held by us and not lost (as far as this process can tell without asking Redis)."""
        return self.fencing_token is not None and not self.lost

    @property
    def lost(self) -> bool:
        """True once a renewal found another holder or the lease surely ran out."""
        if self.lost_event.is_set():
            return True
        if self.fencing_token is not None and self._monotonic() - self._renewed_at >= self.ttl_ms / 1000:
            self.lost_event.set()
        return self.lost_event.is_set()

    async def try_acquire(self) -> bool:
        """One attempt; on success starts the renewal task and sets ``fencing_token``."""
        if self.fencing_token is not None:
            raise LockError(f"lock {self.key} is already held by this instance", name=self.key)
        started = self._monotonic()  # the lease began no earlier than this
        epoch = int(await self._acquire(keys=[self.key, self.epoch_key], args=[self.token, self.ttl_ms]))
        if not epoch:
            return False
        self.fencing_token, self._renewed_at = epoch, started
        self.lost_event.clear()
        self._renewer = asyncio.create_task(self._renew_loop(), name=f"lock-renew:{self.key}")
        return True

    async def acquire(self, timeout_s: float | None = ...) -> int:  # type: ignore[assignment]
        """Wait (asynchronously, with backoff) until the lock is ours; returns the fencing token.

        ``timeout_s`` defaults to ``wait_timeout_s``; ``None`` waits forever, ``0`` tries once.
        Raises LockError when the time is up.
        """
        timeout = self.wait_timeout_s if timeout_s is ... else timeout_s
        deadline = None if timeout is None else self._monotonic() + timeout
        delay = _RETRY_MIN_S
        while not await self.try_acquire():
            if deadline is not None and self._monotonic() + delay > deadline:
                raise LockError(f"could not acquire lock {self.key} within {timeout} s", name=self.key)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)
        return int(self.fencing_token or 0)

    async def renew(self) -> bool:
        """One compare-and-extend; False (and ``lost``) when another holder has the key."""
        started = self._monotonic()
        if int(await self._renew(keys=[self.key], args=[self.token, self.ttl_ms])):
            self._renewed_at = started
            return True
        self.lost_event.set()
        return False

    async def _renew_loop(self) -> None:
        interval = self.renew_ms / 1000
        while not self.lost:
            await asyncio.sleep(interval)
            try:
                if not await self.renew():
                    log.warning("lock %s was taken by another holder", self.key)
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis unreachable: keep trying until the lease runs out
                log.warning("renewing lock %s failed: %s", self.key, exc)

    async def release(self) -> bool:
        """Stop renewing and delete the key if it is still ours; returns whether it was."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            await cancel_and_wait(renewer)
        if self.fencing_token is None:
            return False
        self.fencing_token = None
        return bool(int(await asyncio.shield(self._release(keys=[self.key], args=[self.token]))))

    async def __aenter__(self) -> RedisLock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()


def conversation_lock(redis: Any, keys: Keys, conversation_id: str, **options: Any) -> RedisLock:
    """The lock of one conversation (``keys.conversation_lock`` / ``..._epoch``)."""
    if not isinstance(conversation_id, str) or not conversation_id.strip():
        raise InvalidArgumentError(f"conversation id must be a non-blank string, got {conversation_id!r}")
    return RedisLock(redis, keys.conversation_lock(conversation_id),
                     keys.conversation_lock_epoch(conversation_id), **options)
