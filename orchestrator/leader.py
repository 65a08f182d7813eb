"""Leader election: one lease per role, reused by anything that needs exactly one leader.

``LeaderElector`` campaigns for ``keys.leader(role)`` with the lock scripts of
:mod:`orchestrator.locks`: acquire = ``SET NX PX`` + ``INCR keys.leader_epoch(role)`` in one
Lua script (the epoch is the fencing token), renew = compare-and-extend, release on stop =
compare-and-delete.

Retried commands: when redis-py resends a campaign whose first attempt took the lease but
whose reply was lost, the script finds our own holder id and counts it as elected (a new
term: the epoch is incremented a second time, which is harmless, since a fencing token only
has to grow and nobody ever held the skipped value). A campaign that raised although it
landed is likewise taken over by the next round. A resent renewal re-extends; a resent
release on stop finds the key gone and is ignored.

Stepping down safely: a leader measures, on its own monotonic clock, the time since the
start of its last successful acquire/renew round trip. The lease in Redis cannot expire
before that start + ``ttl_ms``. Once ``ttl_ms - safety_margin_ms`` has passed without a
successful renewal, :attr:`is_leader` is False, even if Redis is unreachable and no
answer ever came: a partitioned leader stops acting **before** another process can have
been elected. The margin covers clock-rate drift between hosts and the time an action takes
after checking :attr:`is_leader`.

Scenario for the defaults (ttl 15 s, renew every 5 s, margin 3 s): a leader whose host
freezes for 20 s wakes up as a follower (12 s passed), and by then another process may lead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from orchestrator.callbacks import call_and_await
from orchestrator.clock import SystemClock
from orchestrator.errors import InvalidArgumentError
from orchestrator.faults import Condition, describe, is_transient
from orchestrator.keys import Keys
from orchestrator.locks import ACQUIRE, RELEASE, RENEW, cancel_and_wait, check_lease, new_token

log = logging.getLogger(__name__)

Callback = Callable[..., Any]


def default_holder_id() -> str:
    """``host:pid:random``: readable in ``redis-cli GET tokiwa:leader:cron``, never reused."""
    return f"{socket.gethostname()}:{os.getpid()}:{new_token()[:8]}"


class LeaderElector:
    """Campaigns for leadership of ``role`` until :meth:`stop`.

    A leader renews every ``renew_ms`` (default ttl/3); a follower tries to take the lease
    every ``retry_ms`` (default ``renew_ms``), so after a leader dies another one leads
    within ``ttl_ms + retry_ms``.

    ``on_elected(epoch)`` and ``on_demoted()`` may be plain or async callables; their
    errors are logged, never fatal. ``clock`` needs ``monotonic()`` and ``async sleep(s)``.
    """

    def __init__(self, redis: Any, keys: Keys, role: str = "cron", holder_id: str | None = None, *,
                 ttl_ms: int = 15_000, renew_ms: int | None = None, retry_ms: int | None = None,
                 safety_margin_ms: int | None = None,
                 clock: Any = None, on_elected: Callback | None = None,
                 on_demoted: Callback | None = None) -> None:
        if not isinstance(role, str) or not role.strip():
            raise InvalidArgumentError(f"leader role must be a non-blank string, got {role!r}")
        self.renew_ms = check_lease(ttl_ms, renew_ms)
        margin = max(ttl_ms // 5, 1) if safety_margin_ms is None else safety_margin_ms
        if not isinstance(margin, int) or not 0 <= margin < ttl_ms - self.renew_ms:
            raise InvalidArgumentError(
                f"safety_margin_ms must be in [0, ttl_ms - renew_ms), got {safety_margin_ms!r}")
        self.retry_ms = self.renew_ms if retry_ms is None else retry_ms
        if not isinstance(self.retry_ms, int) or self.retry_ms < 1:
            raise InvalidArgumentError(f"retry_ms must be an integer >= 1, got {retry_ms!r}")
        self.redis, self.keys, self.role = redis, keys, role
        self.holder_id = holder_id or default_holder_id()
        self.ttl_ms, self.safety_margin_ms = ttl_ms, margin
        self.clock = clock or SystemClock()
        self._listeners: list[tuple[Callback | None, Callback | None]] = [(on_elected, on_demoted)]
        self.key, self.epoch_key = keys.leader(role), keys.leader_epoch(role)
        self._epoch: int | None = None
        self._valid_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._outage = Condition(log, f"leader election for {role!r}")
        self._acquire = redis.register_script(ACQUIRE)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)

    def add_listener(self, on_elected: Callback | None = None, on_demoted: Callback | None = None) -> None:
        """Also call these on election / demotion (after the constructor's callbacks)."""
        self._listeners.append((on_elected, on_demoted))

    @property
    def is_leader(self) -> bool:
        """True while we hold the lease and it surely has not expired anywhere."""
        return self._epoch is not None and self.clock.monotonic() < self._valid_until

    @property
    def epoch(self) -> int | None:
        """The fencing token of our current term, None when not leader."""
        return self._epoch if self.is_leader else None

    async def current_leader(self) -> str | None:
        """The holder id stored in Redis (whoever it is), or None."""
        value = await self.redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    async def try_acquire(self) -> bool:
        """One campaign round trip; True if we became (or stayed) leader."""
        started = self.clock.monotonic()
        epoch = int(await asyncio.wait_for(
            self._acquire(keys=[self.key, self.epoch_key], args=[self.holder_id, self.ttl_ms]),
            self.ttl_ms / 1000))
        if not epoch:
            return False
        self._valid_until = started + (self.ttl_ms - self.safety_margin_ms) / 1000
        if self._epoch != epoch:
            self._epoch = epoch
            log.info("%s elected leader of %r (epoch %d)", self.holder_id, self.role, epoch)
            for elected, _ in list(self._listeners):
                await _call(elected, epoch)
        return True

    async def renew(self) -> bool:
        """Compare-and-extend our lease; demotes us at once when another holder has it."""
        started = self.clock.monotonic()
        status = int(await asyncio.wait_for(
            self._renew(keys=[self.key], args=[self.holder_id, self.ttl_ms]), self.ttl_ms / 1000))
        if status == 1:
            self._valid_until = started + (self.ttl_ms - self.safety_margin_ms) / 1000
            return True
        await self._demote("another holder took the lease" if status == 0 else "the lease expired in Redis")
        return False

    async def _demote(self, why: str) -> None:
        if self._epoch is None:
            return
        self._epoch = None
        log.warning("%s stepped down as leader of %r: %s", self.holder_id, self.role, why)
        for _, demoted in list(self._listeners):
            await _call(demoted)

    async def _round(self) -> None:
        if self._epoch is not None and not self.is_leader:
            await self._demote("could not renew before the safety margin")
        try:
            if self._epoch is not None:
                await self.renew()
            else:
                await self.try_acquire()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down or slow: is_leader runs out on its own
            if is_transient(exc):
                self._outage.hit(exc)  # one line per outage, one when it ends
            else:
                log.error("leader election round for %r failed: %s", self.role, describe(exc))
        else:
            self._outage.clear()
        if self._epoch is not None and not self.is_leader:
            await self._demote("could not renew before the safety margin")

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self._round()
            delay = self.retry_ms / 1000  # a follower campaigns this often
            if self._epoch is not None:  # a leader renews, waking in time to see validity end
                delay = max(0.0, min(self.renew_ms / 1000, self._valid_until - self.clock.monotonic()))
            await self.clock.sleep(delay)

    async def start(self) -> None:
        """Start campaigning in a background task owned by this elector (idempotent)."""
        if self._task is None or self._task.done():
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name=f"leader:{self.role}")

    async def stop(self) -> None:
        """Stop campaigning and release the lease if we hold it (idempotent)."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        if self._epoch is not None:
            try:
                await asyncio.shield(self._release(keys=[self.key], args=[self.holder_id]))
            except Exception as exc:  # the lease then simply expires
                log.warning("releasing leadership of %r failed: %s", self.role, exc)
            await self._demote("stopped")


async def _call(callback: Callback | None, *args: Any) -> None:
    if callback is None:
        return
    try:
        await call_and_await(callback, *args)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("leader election callback %r failed", callback)
