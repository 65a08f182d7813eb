"""Cluster-wide flow control of a registration: a rate limit and a concurrency limit, kept in
Redis, optionally per key taken from the event.

``register_workflow(flow, trigger, rate_limit="10/s", rate_key="customer.id",
concurrency_limit=3, concurrency_key="tenant")`` and ``dispatcher.subscribe(..., rate_limit=...)``
(same names). A key is a dotted payload path, or ``"type"`` (the event type); without one the
limit is the registration's as a whole.

- **Rate**: at most N runs in any window of the period (a sliding-window log: a sorted set of
  start times per key, so the bound is exact across hosts, for every window, not on average).
- **Concurrency**: at most N at once; each holder has a lease (the visibility timeout, renewed
  while it runs), so a holder killed with -9 gives its place back when its lease ends.

An event over a limit is **parked** by its worker: it stays pending and owned (its entry is
renewed), it holds no slot, and it is tried again when the limit says (the wait until the
oldest start leaves the window, or a short poll for a concurrency place). It is not
redelivered, so its delivery count does not grow and ``max_deliveries`` does not apply. The
waits are counted (``tokiwa_limit_waits_total``, ``Consumer.stats.parked``) and the parked
entries show in ``snapshot()``. Each check is one script call on Redis's clock.

The conversation lock is the special case "concurrency 1 per conversation, in order"; it
keeps its own implementation (:mod:`orchestrator.locks`), which also orders the turns.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator import faults
from orchestrator.errors import InvalidArgumentError
from orchestrator.events import Event
from orchestrator.keys import Keys
from orchestrator.runs.routes import value_at

log = logging.getLogger("tokiwa.limits")

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(ms|s|m|h)\s*$")
#: ms between looks at a full concurrency limit (at most; the lease end may come first)
CONCURRENCY_POLL_MS = 100

# KEYS[1] = the key's window (zset of start ids by ms)
# ARGV[1] = limit N, ARGV[2] = window ms, ARGV[3] = a unique member for this start
# Takes a place in the window when fewer than N starts are in the last window ms (Redis's
# clock); returns 0, else the ms until the oldest start leaves the window.
RATE_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window + 1000)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now + 1
if wait < 1 then wait = 1 end
return wait
"""

# KEYS[1] = the key's holders (zset of holder -> lease end ms)
# ARGV[1] = limit N, ARGV[2] = lease ms, ARGV[3] = holder, ARGV[4] = poll ms
# Drops expired leases; takes (or renews) a place for the holder when fewer than N hold one;
# returns 0, else the ms until the next look (the earliest lease end, at most the poll).
CONCURRENCY_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local lease = tonumber(ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], lease + 1000)
  return 0
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = tonumber(first[2]) - now + 1
local poll = tonumber(ARGV[4])
if wait > poll then wait = poll end
if wait < 1 then wait = 1 end
return wait
"""

# KEYS[1] = the key's holders; ARGV[1] = holder, ARGV[2] = lease ms
# Extends the holder's lease if it still holds a place; returns 1 if it did.
CONCURRENCY_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
  return 1
end
return 0
"""


def parse_rate(spec: str) -> tuple[int, int]:
    """``"10/s"``, ``"100/m"``, ``"5/10s"`` -> (count, window ms)."""
    m = _RATE.match(spec) if isinstance(spec, str) else None
    if m is None or int(m.group(1)) < 1:
        raise InvalidArgumentError(f"a rate limit is written N/unit or N/Kunit (10/s, 100/m, 5/10s), got {spec!r}")
    count, every, unit = int(m.group(1)), int(m.group(2) or 1), m.group(3)
    if every < 1:
        raise InvalidArgumentError(f"a rate limit's window must be at least 1 {unit} (N/unit or N/Kunit), got {spec!r}")
    return count, every * _UNITS_MS[unit]


def _key_value(path: str | None, event: Event) -> str:
    if path is None:
        return "*"
    if path == "type":
        return event.type
    value = value_at(event.payload, path)
    return value if value is not None else "-"  # events without the key share one bucket


@dataclass(frozen=True, slots=True)
class Limits:
    """A registration's limits (any may be None)."""

    rate: tuple[int, int] | None = None  # (count, window ms)
    rate_key: str | None = None
    concurrency: int | None = None
    concurrency_key: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Limits | None:
        """From ``rate_limit`` / ``rate_key`` / ``concurrency_limit`` / ``concurrency_key``;
        None when there is no limit."""
        rate = options.get("rate_limit")
        conc = options.get("concurrency_limit")
        for name in ("rate_key", "concurrency_key"):
            value = options.get(name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidArgumentError(f"{name} must be a payload path or 'type', got {value!r}")
        if conc is not None and (isinstance(conc, bool) or not isinstance(conc, int) or conc < 1):
            raise InvalidArgumentError(f"concurrency_limit must be an integer >= 1, got {conc!r}")
        if rate is None and conc is None:
            if options.get("rate_key") or options.get("concurrency_key"):
                raise InvalidArgumentError("rate_key / concurrency_key need rate_limit / concurrency_limit")
            return None
        return cls(parse_rate(rate) if rate is not None else None, options.get("rate_key"), conc,
                   options.get("concurrency_key"))

    def describe(self) -> dict[str, Any]:
        return {"rate": None if self.rate is None else {"count": self.rate[0], "window_ms": self.rate[1]},
                "rate_key": self.rate_key, "concurrency": self.concurrency, "concurrency_key": self.concurrency_key}


class Gate:
    """A registration's limits against Redis. :meth:`enter` returns 0 (go: a concurrency
    place is held until :meth:`leave`) or the ms to wait before trying again."""

    def __init__(self, redis: Any, keys: Keys, route: str, limits: Limits, *, lease_ms: int) -> None:
        self.redis, self.keys, self.route, self.limits, self.lease_ms = redis, keys, route, limits, lease_ms
        #: which events the route takes (by type); the others pass without touching a limit
        self.takes: Callable[[Event], bool] | None = None
        self._rate = redis.register_script(RATE_TAKE)
        self._take = redis.register_script(CONCURRENCY_TAKE)
        self._renew = redis.register_script(CONCURRENCY_RENEW)
        self._held: dict[str, str] = {}  # holder -> its key
        self._renewer: asyncio.Task[None] | None = None
        self.waits = {"rate": 0, "concurrency": 0}

    def _holder(self, event: Event) -> str:
        return f"{event.group}:{event.stream_id or event.id}"

    async def enter(self, event: Event) -> int:
        if self.takes is not None and not self.takes(event):
            return 0  # not the route's type: its handler does not run, so no limit applies
        lim = self.limits
        holder = self._holder(event)
        conc_key = None
        if lim.concurrency is not None:
            conc_key = self.keys.limit(self.route, "concurrency", _key_value(lim.concurrency_key, event))
            wait = int(await self._take(keys=[conc_key], args=[lim.concurrency, self.lease_ms, holder,
                                                               CONCURRENCY_POLL_MS]))
            if wait:
                self.waits["concurrency"] += 1
                return wait
        if lim.rate is not None:
            rate_key = self.keys.limit(self.route, "rate", _key_value(lim.rate_key, event))
            wait = int(await self._rate(keys=[rate_key], args=[lim.rate[0], lim.rate[1], uuid.uuid4().hex]))
            if wait:
                self.waits["rate"] += 1
                if conc_key is not None:  # give the place back: we do not run now
                    await self.redis.zrem(conc_key, holder)
                return wait
        if conc_key is not None:
            self._held[holder] = conc_key
            self._ensure_renewer()
        return 0

    async def leave(self, event: Event) -> None:
        if self.takes is not None and not self.takes(event):
            return
        key = self._held.pop(self._holder(event), None)
        if key is not None:
            try:
                await self.redis.zrem(key, self._holder(event))
            except Exception as exc:  # the lease then simply ends
                self._fault("releasing a place", exc)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_loop(), name=f"tokiwa-limit-renewer-{self.route}")

    async def _renew_loop(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_ms / 3000)
            for holder, key in list(self._held.items()):
                try:
                    await self._renew(keys=[key], args=[holder, self.lease_ms])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the next round renews; a lapse frees a place early
                    self._fault("renewing a place", exc)

    def _fault(self, what: str, exc: Exception) -> None:
        """A transient Redis fault counts against its condition (one line per episode); anything
        else is logged with its traceback, never swallowed."""
        if faults.report(exc) not in faults.TRANSIENT:
            log.error("limit of %s: %s failed", self.route, what, exc_info=exc)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
