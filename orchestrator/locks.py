"""A Redis lease lock with fencing tokens, background renewal and a loss watchdog; and the
one idempotent claim (``SET NX`` that a retried command cannot lose).

``RedisLock`` is the primitive under conversation locks (and, through the same scripts,
leader election in :mod:`orchestrator.leader`):

- acquire: one Lua script does ``SET key token PX ttl`` when the key is free **or already
  holds our token**, then ``INCR`` of the lock's epoch key. The new epoch is the **fencing
  token**: it grows with every acquisition, so a writer can prove it is the newest holder
  (stores refuse writes with an older token).
- renew: compare-and-extend (``PEXPIRE`` only while the value is still our token).
- release: compare-and-delete. Nothing is ever done by "check, then act" from Python.

Retried commands. redis-py resends a command after a timeout or a dropped connection
(:mod:`orchestrator.broker.connection`), so a script may run twice when only its reply was lost.
Acquire is idempotent as to *holding*: the resent script finds our own token and counts as
acquired; it increments the epoch a second time, which is harmless (the fencing token only
has to grow, and nobody ever held the skipped value). Renew re-extends (idempotent); a
resent release finds the key gone and answers "not ours", which only misreports the return
value. :func:`claim` is ``SET NX`` with the same rule (a claim that finds its own token was
ours), for once-subscribers and anything else that must be taken exactly once.

Losing the lock. While held, a renewal task extends the lease every ``renew_ms``, and a
watchdog timer on the event loop fires when ``ttl_ms`` have passed since the start of the
last successful acquire/renew round trip (the lease cannot have expired in Redis before
that). The lock is **lost** when a renewal finds another holder or the key gone, when a
renewal fails with an error that does not pass by itself, or when the watchdog fires:
``lost`` turns True, ``lost_event`` is set, and the callbacks given to :meth:`RedisLock.on_lost`
run at once, synchronously. After a freeze (SIGSTOP, a VM pause, a blocked loop) the
watchdog's timer is overdue, so it runs in the loop's first round after the resume, before
any task whose sleep or read ended meanwhile takes its next step: a callback that cancels
the protected work (the chatflow executor cancels the run's nodes) stops it before it does
anything more. The renewal task also checks the monotonic clock before it talks to Redis.

Scenario for the defaults: a chatflow run that takes 5 minutes keeps its 30 s lease by
renewing every 10 s; if its worker is SIGKILLed, the lease expires within 30 s and the
conversation's next run (the redelivered event) can take it; if its worker is frozen for
40 s, the run is cancelled the moment the worker resumes, and its event is redone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from types import EllipsisType
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from orchestrator.errors import InvalidArgumentError, LockError
from orchestrator.events import check_conversation_id
from orchestrator.faults import Backoff, Condition, describe, is_transient
from orchestrator.keys import Keys

log = logging.getLogger(__name__)

# KEYS[1] = lock key, KEYS[2] = epoch key
# ARGV[1] = holder token, ARGV[2] = ttl ms
# Takes the lock if it is free or already ours (a new term, or our own retried acquire whose
# reply was lost); returns the new epoch (fencing token), or 0 when another holder has it.
# An epoch key that did not exist (new, or lost with Redis's data) starts at Redis's clock in
# ms, not at 1, so a fencing token never repeats after Redis comes back empty (it would take
# more acquisitions than milliseconds passed to catch up with a lost epoch).
ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local epoch = redis.call('INCR', KEYS[2])
if epoch == 1 then
  local t = redis.call('TIME')
  local seeded = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  redis.call('SET', KEYS[2], seeded)
  return tonumber(seeded)
end
return epoch
"""

# KEYS[1] = lock key
# ARGV[1] = holder token, ARGV[2] = ttl ms
# Extends the lease only while the value is ARGV[1]. Returns 1 extended, 0 another holder
# has it, -1 the key is gone (expired or deleted).
RENEW = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if cur then return 0 end
return -1
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

# KEYS[1] = claim key
# ARGV[1] = claim token (unique per claim call), ARGV[2] = ttl ms ('' = no expiry)
# SET NX that a resent command cannot lose: a key already holding ARGV[1] is our own claim
# (the first attempt landed, its reply did not). Returns 1 claimed, 0 claimed by another.
CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return 1 end
if cur then return 0 end
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""

# Retry delay bounds while waiting for a held lock (seconds): starts small so that a
# conversation's next run starts right after the previous one releases.
_RETRY_MIN_S = 0.005
_RETRY_MAX_S = 0.2

LostCallback = Callable[[str], object]
#: queues reads on the transaction that takes a lock (see RedisLock.try_acquire)
ReadsFn = Callable[[Any], None]


def _is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


def new_token() -> str:
    """A holder token no other process will ever use."""
    return uuid.uuid4().hex


async def claim(redis: Any, key: str, token: str, *, ttl_ms: int | None = None) -> bool:
    """Take ``key`` for ``token`` if nobody has (``SET NX``, optionally ``PX ttl_ms``); True if
    it is ours. Idempotent for one token: when redis-py resends the command because the reply
    was lost, the resent one finds our token and answers True. ``token`` must be unique per
    claim (see :func:`claim_once`), or two claims of one holder would both win."""
    return int(await redis.eval(CLAIM, 1, key, token, "" if ttl_ms is None else int(ttl_ms))) == 1


async def claim_once(redis: Any, key: str, holder: str) -> bool:
    """The cluster-wide claim of a ``once=True`` subscriber (``keys.once(name)``): True for
    exactly one caller ever. The stored value is ``<holder>/<random>``, unique per call."""
    return await claim(redis, key, f"{holder}/{new_token()}")


#: a cancelled task that still runs after this is cancelled again (see cancel_and_wait)
RECANCEL_AFTER_S = 0.5


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task we own and wait for it; re-raises only if *we* are being cancelled.

    On Python 3.11 ``asyncio.wait_for`` (which redis-py uses for every command) can swallow a
    cancellation that lands as its inner call completes, and the task then runs on: so a task
    still running :data:`RECANCEL_AFTER_S` after a cancel is cancelled again, until it ends."""
    task.cancel()
    while not task.done():
        await asyncio.wait({task}, timeout=RECANCEL_AFTER_S)
        if not task.done():
            log.debug("task %s ignored a cancellation; cancelling it again", task.get_name())
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
        #: why the lock was lost (None while it is not)
        self.lost_reason: str | None = None
        self._monotonic = monotonic
        self._renewed_at = 0.0
        self._renewer: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._on_lost: list[LostCallback] = []
        #: replies of the ``reads`` sent with the acquisition (see :meth:`try_acquire`)
        self.reads_at_acquire: list[Any] | None = None
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
        """True once the lock was found lost (see the module docstring); also checks the
        monotonic clock, so it turns True the moment a whole ttl passed without a renewal."""
        if not self.lost_event.is_set() and self.fencing_token is not None and self._left_s() <= 0:
            self._mark_lost(f"no renewal confirmed it within its {self.ttl_ms} ms lease")
        return self.lost_event.is_set()

    def on_lost(self, callback: LostCallback) -> Callable[[], None]:
        """Call ``callback(reason)`` synchronously, once per acquisition, the moment the lock
        is found lost (never on :meth:`release`). Returns a function that removes it."""
        self._on_lost.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._on_lost.remove(callback)
        return remove

    def _left_s(self) -> float:
        """Seconds until the lease surely ran out, on our clock (<= 0: it may have)."""
        return self._renewed_at + self.ttl_ms / 1000 - self._monotonic()

    def _mark_lost(self, reason: str) -> None:
        if self.lost_event.is_set():
            return
        self.lost_reason = reason
        self.lost_event.set()
        self._disarm()
        log.warning("lock %s lost: %s", self.key, reason)
        for callback in list(self._on_lost):
            try:
                callback(reason)
            except Exception:
                log.exception("on_lost callback %r of lock %s failed", callback, self.key)

    def _arm(self) -> None:
        """(Re)start the watchdog for the current lease."""
        self._disarm()
        self._watchdog = asyncio.get_running_loop().call_later(max(0.0, self._left_s()), self._on_watchdog)

    def _disarm(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()

    def _on_watchdog(self) -> None:
        self._watchdog = None
        if self.fencing_token is None or self.lost_event.is_set():
            return
        if self._left_s() <= 0:
            self._mark_lost(f"no renewal confirmed it within its {self.ttl_ms} ms lease")
        else:  # the loop's timer fired a hair early, or the injected clock runs differently
            self._arm()

    def _renewer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task is not self._renewer:
            return
        exc = task.exception()
        if exc is not None:  # a renewer that died cannot keep the lease: say so now
            log.error("the renewal task of lock %s died", self.key, exc_info=exc)
            self._mark_lost(f"its renewal task died: {describe(exc)}")

    async def try_acquire(self, reads: ReadsFn | None = None) -> bool:
        """One attempt; on success starts the renewal task and sets ``fencing_token``.

        ``reads(pipe)`` queues reads of keys in the lock's hash slot on a transaction that also
        takes the lock (one round trip, and the reads see the state right after the take); on
        success their replies are in :attr:`reads_at_acquire`. A Redis Cluster client takes
        the lock and reads in two steps."""
        if self.fencing_token is not None:
            raise LockError(f"lock {self.key} is already held by this instance", name=self.key)
        started = self._monotonic()  # the lease began no earlier than this
        self.reads_at_acquire = None
        if reads is not None and not _is_cluster(self.redis):
            epoch, replies = await self._acquire_reading(reads)
            if epoch:
                self.reads_at_acquire = replies
        else:
            epoch = int(await self._acquire(keys=[self.key, self.epoch_key], args=[self.token, self.ttl_ms]))
        if not epoch:
            return False
        self.fencing_token, self._renewed_at = epoch, started
        self.lost_event.clear()
        self.lost_reason = None
        self._arm()
        self._renewer = asyncio.create_task(self._renew_loop(), name=f"lock-renew:{self.key}")
        self._renewer.add_done_callback(self._renewer_done)
        return True

    async def _acquire_reading(self, reads: ReadsFn) -> tuple[int, list[Any]]:
        """ACQUIRE by its sha and ``reads`` in one MULTI; the script is loaded first if Redis
        does not know it (a restart, a failover) and the transaction sent again."""
        for _ in range(2):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.evalsha(self._acquire.sha, 2, self.key, self.epoch_key, self.token, self.ttl_ms)
                reads(pipe)
                replies = await pipe.execute(raise_on_error=False)
            if isinstance(replies[0], NoScriptError):
                await self.redis.script_load(ACQUIRE)
                continue
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return int(replies[0]), list(replies[1:])
        raise LockError(f"could not load the acquire script for lock {self.key}", name=self.key)

    async def acquire(self, timeout_s: float | None | EllipsisType = ..., *, reads: ReadsFn | None = None) -> int:
        """Wait (asynchronously, with backoff) until the lock is ours; returns the fencing token.

        ``timeout_s`` defaults to ``wait_timeout_s``; ``None`` waits forever, ``0`` tries once.
        ``reads``: see :meth:`try_acquire`.
        Transient Redis faults are waited out within that time (one log line per outage).
        Raises LockError when the time is up; when the last attempt failed on a Redis error,
        whose command may have landed without its reply, our token is deleted first (compare-
        and-delete), so the key does not stay taken for a whole lease by nobody.
        """
        timeout = self.wait_timeout_s if timeout_s is ... else timeout_s
        deadline = None if timeout is None else self._monotonic() + timeout
        delay = _RETRY_MIN_S
        outage: Condition | None = None
        backoff = Backoff(base_s=_RETRY_MIN_S, cap_s=1.0)
        while True:
            error: Exception | None = None
            try:
                if await self.try_acquire(reads):
                    if outage is not None:
                        outage.clear()
                    return int(self.fencing_token or 0)
                wait = delay
                delay = min(delay * 2, _RETRY_MAX_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    await self._forget_attempt()
                    raise
                outage = outage or Condition(log, f"acquiring lock {self.key}")
                outage.hit(exc)
                error, wait = exc, backoff.next_delay()
            if deadline is not None and self._monotonic() + wait > deadline:
                if error is not None:
                    await self._forget_attempt()
                raise LockError(f"could not acquire lock {self.key} within {timeout} s", name=self.key) from error
            await asyncio.sleep(wait)

    async def _forget_attempt(self) -> None:
        """Delete our token if an attempt that raised had taken the key after all. Bounded by
        the lease: past it, the key expired by itself."""
        if self.fencing_token is not None:
            return
        try:
            async with asyncio.timeout(self.ttl_ms / 1000):
                await self._release(keys=[self.key], args=[self.token])
        except Exception as exc:
            log.info("could not clear a failed acquire of lock %s (it expires by itself): %s", self.key, exc)

    async def renew(self) -> bool:
        """One compare-and-extend; False (and ``lost``) when another holder has the key, the
        key is gone, or the lock was already lost."""
        started = self._monotonic()
        status = int(await self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
        if status == 1:
            if self.lost_event.is_set():  # lost meanwhile (the watchdog fired): stays lost
                return False
            self._renewed_at = started
            self._arm()
            return True
        self._mark_lost("another holder took it" if status == 0 else "its key expired or was deleted")
        return False

    async def _renew_loop(self) -> None:
        interval = self.renew_ms / 1000
        outage = Condition(log, f"renewing lock {self.key}")
        backoff = Backoff(base_s=min(0.05, interval / 4), cap_s=interval)
        delay = interval
        while True:
            await asyncio.sleep(delay)
            if self.lost:  # the clock first: after a freeze there is no point asking Redis
                return
            try:
                async with asyncio.timeout(max(self._left_s(), 0.001)):  # no answer counts past the lease
                    await self.renew()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    log.error("renewing lock %s failed: %s", self.key, describe(exc))
                    self._mark_lost(f"renewal failed: {describe(exc)}")
                    return
                outage.hit(exc)  # keep trying until the lease runs out (the watchdog)
                delay = backoff.next_delay()
                continue
            if self.lost:
                return
            outage.clear()
            backoff.reset()
            delay = interval

    async def hand_over(self) -> str | None:
        """Stop renewing and count the lock as released here, returning the holder token for
        the caller's own script to delete the key with (compare-and-delete, say after a last
        write in the same step); None when it is not held. Past its lease the key expires by
        itself should that script not run."""
        renewer, self._renewer = self._renewer, None
        self._disarm()
        if renewer is not None:
            await cancel_and_wait(renewer)
        if self.fencing_token is None:
            return None
        self.fencing_token = None
        return self.token

    async def release(self) -> bool:
        """Stop renewing and delete the key if it is still ours; returns whether it was."""
        renewer, self._renewer = self._renewer, None
        self._disarm()
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
    check_conversation_id(conversation_id)
    return RedisLock(redis, keys.conversation_lock(conversation_id),
                     keys.conversation_lock_epoch(conversation_id), **options)
