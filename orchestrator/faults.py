"""The fault model: every Redis error tokiwa can meet belongs to one class, and each class has
one policy. Every component (consumer, producer, locks, leader, relay, stores, CLIs) asks
:func:`classify` what an error is and acts by :data:`POLICY`; none matches error text itself.

==================  =====================================================  ==================
class               what it is                                             policy
==================  =====================================================  ==================
``CONNECTION``      refused / reset / timeout / half-open link, LOADING    reconnect
``NOGROUP``         the consumer group is gone (Redis came back empty)     recreate
``OOM``             maxmemory reached with ``noeviction``                  back off the write
``FAILOVER``        READONLY, MOVED / ASK, TRYAGAIN, CLUSTERDOWN,          re-resolve, retry
                    MASTERDOWN, UNBLOCKED (a blocked read on a demoted
                    master), NOREPLICAS, Sentinel: no master known, "the
                    previous master is now a slave"; redis-py's cluster
                    client: redirects exhausted, a slot not covered
``BUSY``            a script runs too long (BUSY)                          retry with backoff
``NOSCRIPT``        the script cache was flushed                           reload, retry
``SCRIPT``          a script failed on an entry's data                     dead-letter
``FATAL``           auth, ACL, wrong type, anything else                   fail loudly
==================  =====================================================  ==================

:class:`Backoff` is the one jittered exponential backoff, and :class:`Condition` logs one line
when a condition starts and one when it ends, never one per failed call.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import random
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis import exceptions as rx
from redis.asyncio.sentinel import MasterNotFoundError as AsyncMasterNotFound
from redis.sentinel import MasterNotFoundError as SyncMasterNotFound

T = TypeVar("T")


class Fault(enum.Enum):
    CONNECTION = "connection"
    NOGROUP = "nogroup"
    OOM = "oom"
    FAILOVER = "failover"
    BUSY = "busy"
    NOSCRIPT = "noscript"
    SCRIPT = "script"
    FATAL = "fatal"


class Policy(enum.Enum):
    RECONNECT = "reconnect with jittered backoff"
    RECREATE = "recreate the consumer group from 0 and resume"
    BACK_OFF = "keep acking and trimming, back off the failed write"
    RETRY = "re-resolve the master or slot and retry"
    DEAD_LETTER = "dead-letter the entry with the reason"
    FAIL = "log and exit non-zero"


POLICY: dict[Fault, Policy] = {
    Fault.CONNECTION: Policy.RECONNECT,
    Fault.NOGROUP: Policy.RECREATE,
    Fault.OOM: Policy.BACK_OFF,
    Fault.FAILOVER: Policy.RETRY,
    Fault.BUSY: Policy.RETRY,
    Fault.NOSCRIPT: Policy.RETRY,
    Fault.SCRIPT: Policy.DEAD_LETTER,
    Fault.FATAL: Policy.FAIL,
}

#: faults that pass by themselves: the caller waits (with :class:`Backoff`) and tries again
TRANSIENT = frozenset({Fault.CONNECTION, Fault.OOM, Fault.FAILOVER, Fault.BUSY, Fault.NOSCRIPT})

# UNBLOCKED: Redis ends a blocked XREADGROUP with it when the master is turned into a replica;
# NOREPLICAS: a master with min-replicas-to-write that lost its replicas (a demoted one, often)
_FAILOVER_PREFIXES = ("READONLY", "MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "UNBLOCKED",
                      "NOREPLICAS")


def _message(exc: BaseException) -> str:
    return str(exc).lstrip()


def classify(exc: BaseException) -> Fault:
    """The fault class of ``exc`` (any exception; non-Redis ones are ``FATAL`` unless they are
    socket errors)."""
    # auth and ACL errors subclass ConnectionError in redis-py but never pass by themselves
    if isinstance(exc, (rx.AuthenticationError, rx.AuthorizationError, rx.NoPermissionError,
                        rx.AuthenticationWrongNumberOfArgsError)):
        return Fault.FATAL
    if isinstance(exc, (rx.ReadOnlyError, rx.AskError, rx.TryAgainError, rx.ClusterError, rx.SlotNotCoveredError)) \
            or _sentinel_failover(exc):
        # MovedError, ClusterDownError and MasterDownError are subclasses; a ClusterError is
        # also redis-py's cluster client giving up on redirects ("TTL exhausted"), and a slot
        # not covered is a cluster whose failover has not finished
        return Fault.FAILOVER
    if isinstance(exc, rx.OutOfMemoryError):
        return Fault.OOM
    if isinstance(exc, rx.NoScriptError):
        return Fault.NOSCRIPT
    if _certificate_refused(exc):  # a link that can never be trusted: waiting cannot help
        return Fault.FATAL
    if isinstance(exc, (rx.ConnectionError, rx.TimeoutError, ConnectionError, TimeoutError,
                        asyncio.TimeoutError, OSError)):
        return Fault.CONNECTION  # BusyLoadingError (LOADING) is a ConnectionError
    if isinstance(exc, rx.ResponseError):
        return _classify_reply(_message(exc).upper())
    if _closed_under_redis(exc):
        return Fault.CONNECTION
    return Fault.FATAL


def _closed_under_redis(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py using a connection that was closed under it (its stream
    writer or reader already None): an AttributeError raised inside redis-py's connection code,
    which its cluster client meets when a node goes away mid-command. A lost link, not a bug."""
    if not isinstance(exc, AttributeError) or "'NoneType' object" not in str(exc):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "/redis/" in tb.tb_frame.f_code.co_filename.replace("\\", "/")


def _sentinel_failover(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py's Sentinel client meeting a failover: no sentinel names a
    healthy master yet, or the master answered READONLY (it was demoted; redis-py drops that
    connection and raises a ConnectionError from the READONLY, so the next connect asks the
    sentinels again)."""
    if isinstance(exc, (AsyncMasterNotFound, SyncMasterNotFound)):
        return True
    return isinstance(exc, rx.ConnectionError) and isinstance(exc.__context__, rx.ReadOnlyError)


def _certificate_refused(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a TLS certificate that failed
    verification (redis-py wraps it in a ConnectionError)."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _classify_reply(upper: str) -> Fault:
    """The class of an error reply by its text (errors raised inside a script reach redis-py
    as plain ResponseErrors carrying the inner command's reply)."""
    if "NOGROUP" in upper:
        return Fault.NOGROUP
    if upper.startswith("OOM") or "COMMAND NOT ALLOWED WHEN USED MEMORY" in upper:
        return Fault.OOM
    if upper.startswith(_FAILOVER_PREFIXES) or " READONLY " in upper:
        return Fault.FAILOVER
    if upper.startswith("BUSY") and not upper.startswith("BUSYGROUP"):
        return Fault.BUSY
    if upper.startswith("NOSCRIPT"):
        return Fault.NOSCRIPT
    if upper.startswith(("NOPERM", "NOAUTH", "WRONGPASS", "WRONGTYPE")):
        return Fault.FATAL
    if "SCRIPT" in upper or "LUA" in upper:
        return Fault.SCRIPT
    return Fault.FATAL


def is_missing_key(exc: BaseException) -> bool:
    """Whether ``exc`` says the key does not exist (XINFO on a stream not created yet)."""
    return isinstance(exc, rx.ResponseError) and "no such key" in _message(exc).lower()


def is_group_exists(exc: BaseException) -> bool:
    """Whether ``exc`` is XGROUP CREATE's BUSYGROUP: the group exists already (benign)."""
    return isinstance(exc, rx.ResponseError) and _message(exc).upper().startswith("BUSYGROUP")


def is_transient(exc: BaseException) -> bool:
    return classify(exc) in TRANSIENT


def describe(exc: BaseException) -> str:
    """One line for a person: the class, then the error."""
    text = _message(exc) or type(exc).__name__
    return f"{classify(exc).value}: {text.splitlines()[0][:300]}"


_HINTS = {
    Fault.CONNECTION: "is Redis running and reachable? check --redis-url / TOKIWA_REDIS_URL",
    Fault.OOM: "Redis is full (maxmemory): raise maxmemory, or let workers drain the stream",
    Fault.FAILOVER: "Redis is failing over or resharding: try again in a moment",
    Fault.BUSY: "Redis is busy running a long script: try again in a moment",
    Fault.NOGROUP: "the consumer group is missing: start a worker, which recreates it",
}


def refused_access(exc: BaseException) -> str | None:
    """``"password"`` when Redis refused the credentials, ``"acl"`` when an ACL rule refused a
    command, key or channel, else None."""
    upper = _message(exc).upper()
    if isinstance(exc, (rx.AuthenticationError, rx.AuthenticationWrongNumberOfArgsError)) or \
            upper.startswith(("NOAUTH", "WRONGPASS")):
        return "password"
    if isinstance(exc, (rx.NoPermissionError, rx.AuthorizationError)) or upper.startswith("NOPERM"):
        return "acl"
    return None


def hint(exc: BaseException) -> str:
    """What a person should check for ``exc``, in one sentence."""
    refused = refused_access(exc)
    if refused == "password":
        return "check the password / ACL user in the Redis URL"
    if refused == "acl":
        return "the Redis ACL user lacks a permission tokiwa needs (docs/faults.md lists them)"
    return _HINTS.get(classify(exc), "see docs/faults.md")


#: a background task that fails this many times within RESTART_WINDOW_S on something that
#: is not a transient Redis fault stops for good (and with it the worker)
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0


class RestartBudget:
    """The restart rule of a background task (consumer tasks, the delay mover, the cancel
    watcher): a failure that is not transient is logged and the task restarted, unless it is
    a fatal Redis reply (ACL, wrong type) or the :data:`MAX_RESTARTS` + 1-th within
    :data:`RESTART_WINDOW_S`: then the task stops for good and the worker with it."""

    def __init__(self, what: str, *, stops: str = "it", limit: int = MAX_RESTARTS,
                 window_s: float = RESTART_WINDOW_S) -> None:
        self.what, self.stops, self.limit, self.window_s = what, stops, limit, window_s
        self._failures: collections.deque[float] = collections.deque()
        self.restarts = 0

    def spend(self, exc: BaseException) -> bool:
        """Count and log one failure; True when the task may restart, False when it must stop."""
        now = time.monotonic()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.window_s:
            self._failures.popleft()
        if (isinstance(exc, rx.RedisError) and classify(exc) is Fault.FATAL) or len(self._failures) > self.limit:
            log.error("%s failed (%s); stopping %s", self.what, describe(exc), self.stops, exc_info=exc)
            return False
        self.restarts += 1
        log.error("%s failed; restarting it (%d in the last %.0fs)", self.what, len(self._failures),
                  self.window_s, exc_info=exc)
        return True

    def reset(self) -> None:
        self._failures.clear()


class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2**n)),
    but never less than ``floor``."""

    def __init__(self, base_s: float = 0.05, cap_s: float = 5.0, floor_s: float = 0.0) -> None:
        self.base_s, self.cap_s, self.floor_s = base_s, cap_s, floor_s
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.attempt, 20))
        self.attempt += 1
        return max(self.floor_s, random.uniform(0, ceiling))

    async def sleep(self) -> float:
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay

    def reset(self) -> None:
        self.attempt = 0


class Condition:
    """One log line when a condition (an outage, a full Redis) starts, one when it ends.

    ``hit(exc)`` while it holds only counts; ``clear()`` logs how long it lasted."""

    def __init__(self, logger: logging.Logger, what: str, level: int = logging.WARNING) -> None:
        self.logger, self.what, self.level = logger, what, level
        self._lock = threading.Lock()  # publish_sync may meet a fault from several threads
        self.since: float | None = None
        self.hits = 0
        self.episodes = 0

    @property
    def active(self) -> bool:
        return self.since is not None

    def hit(self, exc: BaseException | str) -> bool:
        """Record a failure; returns True when this one started the condition (and was logged)."""
        with self._lock:
            self.hits += 1
            if self.since is not None:
                return False
            self.since = time.monotonic()
            self.episodes += 1
        text = exc if isinstance(exc, str) else describe(exc)
        self.logger.log(self.level, "%s (%s); %s", self.what, text, self._action(exc))
        return True

    @staticmethod
    def _action(exc: BaseException | str) -> str:
        if isinstance(exc, str):
            return "retrying"
        return {
            Policy.RECONNECT: "reconnecting with backoff",
            Policy.RECREATE: "recreating the consumer group",
            Policy.BACK_OFF: "backing off the writes that failed (acks and trims go on)",
            Policy.RETRY: "retrying on the new master / slot",
        }.get(POLICY[classify(exc)], "retrying")

    def clear(self) -> float | None:
        """End the condition; returns how long it lasted (None if it was not active)."""
        with self._lock:
            if self.since is None:
                return None
            lasted = time.monotonic() - self.since
            self.since = None
        self.logger.log(self.level, "%s: recovered after %.1fs", self.what, lasted)
        return lasted


async def retry_transient(
    op: Callable[[], Awaitable[T]],
    cond: Condition | None = None,
    *,
    backoff: Backoff | None = None,
    on_nogroup: Callable[[], Awaitable[object]] | None = None,
    stop: asyncio.Event | None = None,
    deadline_s: float | None = None,
) -> T:
    """Run ``op`` until it succeeds, waiting out transient faults (and recreating the group on
    NOGROUP when ``on_nogroup`` is given). ``SCRIPT`` and ``FATAL`` errors are raised at once;
    so is the last transient one when ``stop`` is set or ``deadline_s`` passes. Failures are
    logged through ``cond``, by default the process-wide condition of their class."""
    backoff = backoff or Backoff()
    end = None if deadline_s is None else time.monotonic() + deadline_s
    met: set[Fault] = set()
    while True:
        try:
            result = await op()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            fault = classify(exc)
            if fault is Fault.NOGROUP and on_nogroup is not None:
                (cond or condition(fault)).hit(exc)
                met.add(fault)
                await on_nogroup()
                continue
            if fault not in TRANSIENT:
                raise
            (cond or condition(fault)).hit(exc)
            met.add(fault)
            if (stop is not None and stop.is_set()) or (end is not None and time.monotonic() >= end):
                raise
            await backoff.sleep()
            continue
        if cond is not None:
            cond.clear()
        else:
            recovered(*met)
        backoff.reset()
        return result


# -- one condition per fault class, shared by every component of the process ----------------
log = logging.getLogger("tokiwa.faults")

_WHAT = {
    Fault.CONNECTION: "redis unreachable",
    Fault.NOGROUP: "consumer group missing (redis restarted empty?)",
    Fault.OOM: "redis is full (maxmemory with noeviction)",
    Fault.FAILOVER: "redis failover or cluster redirect",
    Fault.BUSY: "redis busy (a script runs long)",
    Fault.NOSCRIPT: "redis script cache flushed",
}
_CONDITIONS: dict[Fault, Condition] = {}


def condition(fault: Fault) -> Condition:
    """The process-wide :class:`Condition` of a transient fault class: whichever component
    meets the fault first logs it, and whichever succeeds first afterwards logs the recovery."""
    cond = _CONDITIONS.get(fault)
    if cond is None:
        level = logging.ERROR if fault is Fault.OOM else logging.WARNING
        cond = _CONDITIONS[fault] = Condition(log, _WHAT.get(fault, fault.value), level)
    return cond


def report(exc: BaseException) -> Fault:
    """Count ``exc`` against its fault class's condition (logged once per episode); returns
    the class."""
    fault = classify(exc)
    if fault in _WHAT:
        condition(fault).hit(exc)
    return fault


def recovered(*faults: Fault) -> None:
    """Say that operations which met ``faults`` succeed again (ends their conditions)."""
    for fault in faults:
        cond = _CONDITIONS.get(fault)
        if cond is not None and cond.active:
            cond.clear()


def reset_conditions() -> None:
    """Forget every condition (tests, and a process that starts over)."""
    _CONDITIONS.clear()
