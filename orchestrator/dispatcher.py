"""EventDispatcher: subscribers by exact type or ``"*"``, run one after another.

Semantics follow tokiwa's dispatcher (SEED-SEMANTICS §2.2): for one event, subscribers of the
exact type run first, then glob subscribers (``order.*``: :func:`orchestrator.events.type_matches`),
then ``"*"`` subscribers, each in subscription order; a failing filter
or handler is recorded (stage ``filter`` / ``handler``) and the others still run; ``dispatch``
never raises.

``once=True`` is once for the whole cluster: before the handler runs, the subscriber is
claimed under ``{ns}:once:{name}`` (the name defaults to the handler's qualified name, so
every process derives the same key) by ``once_claim(name)``; the app sets it to
:func:`orchestrator.locks.claim_once`, a ``SET NX`` that redis-py's resend after a lost reply
cannot turn into "claimed by someone else" (a plain ``SET NX`` would: the resend answers nil
and nobody ever runs the handler). Without a Redis claim function (a purely local
dispatcher) it is once per process. A claim that fails with an error does not run the
handler (at most once) and is reported with stage ``once``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.callbacks import call_in_thread, is_async_callable
from orchestrator.errors import InvalidArgumentError
from orchestrator.events import Event, is_glob, type_matches

log = logging.getLogger("tokiwa.dispatcher")
#: distinct event types whose subscriber lists are cached
_CACHE_MAX = 10_000


def _order(sub: Subscriber) -> int:
    return int(sub.id.rpartition("-")[2])

Handler = Callable[..., Any]
Filter = Callable[[Event], bool]
OnceClaim = Callable[[str], Awaitable[bool]]


@dataclass(slots=True)
class Subscriber:
    id: str
    event_type: str
    handler: Handler
    name: str
    filter: Filter | None = None
    once: bool = False
    is_async: bool = False
    takes_context: bool = False
    #: flow control on workers (rate_limit, rate_key, concurrency_limit, concurrency_key)
    limits: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class DispatchContext:
    """Second argument of handlers that accept two: who is being called, by whom."""

    subscriber_id: str
    dispatcher: EventDispatcher
    event_type: str


@dataclass(slots=True)
class DispatchError:
    subscriber_id: str
    name: str
    stage: str  # "filter" | "handler" | "once"
    error: BaseException


@dataclass(slots=True)
class DispatchResult:
    event: Event
    delivered: int = 0
    errors: list[DispatchError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _qualname(handler: Handler) -> str:
    module = getattr(handler, "__module__", None) or "anon"
    name = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    return f"{module}.{name}"


def _positional_arity(handler: Handler) -> int:
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return 1
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


class EventDispatcher:
    """Routes an event to every matching subscriber, sequentially.

    Handlers take ``(event)`` or ``(event, ctx)``; they may be ``async def`` or plain ``def``
    (plain ones run in the default thread pool so they never block the event loop).
    """

    def __init__(self) -> None:
        self._by_type: dict[str, list[Subscriber]] = {}
        self._cache: dict[str, tuple[Subscriber, ...]] = {}
        self._ids = itertools.count(1)
        self.once_claim: OnceClaim | None = None

    def subscribe(
        self,
        event_type: str,
        handler: Handler,
        filter: Filter | None = None,  # noqa: A002 - public name from tokiwa
        once: bool = False,
        *,
        name: str | None = None,
        rate_limit: str | None = None,
        rate_key: str | None = None,
        concurrency_limit: int | None = None,
        concurrency_key: str | None = None,
    ) -> str:
        """Subscribe ``handler`` to ``event_type`` (or ``"*"``, or a glob such as ``order.*``);
        returns the subscriber id. The limits apply on workers, cluster-wide
        (:mod:`orchestrator.runs.limits`)."""
        if not isinstance(event_type, str) or not event_type.strip():
            raise InvalidArgumentError(f"event type must be a non-blank string, got {event_type!r}")
        if not callable(handler):
            raise InvalidArgumentError(f"handler for {event_type!r} is not callable: {handler!r}")
        if filter is not None and not callable(filter):
            raise InvalidArgumentError(f"filter for {event_type!r} is not callable: {filter!r}")
        sub = Subscriber(
            id=f"sub-{next(self._ids)}",
            event_type=event_type,
            handler=handler,
            name=name or _qualname(handler),
            filter=filter,
            once=once,
            is_async=is_async_callable(handler),
            takes_context=_positional_arity(handler) >= 2,
            limits={k: v for k, v in (("rate_limit", rate_limit), ("rate_key", rate_key),
                                      ("concurrency_limit", concurrency_limit),
                                      ("concurrency_key", concurrency_key)) if v is not None},
        )
        self._by_type.setdefault(event_type, []).append(sub)
        self._cache.clear()
        return sub.id

    def unsubscribe(self, subscriber_id: str) -> bool:
        """Remove a subscriber; returns whether it existed."""
        for event_type, subs in self._by_type.items():
            for i, sub in enumerate(subs):
                if sub.id == subscriber_id:
                    del subs[i]
                    if not subs:
                        del self._by_type[event_type]
                    self._cache.clear()
                    return True
        return False

    def clear(self, event_type: str | None = None) -> None:
        """Remove every subscriber, or those of one type (``clear("*")`` removes wildcards)."""
        if event_type is None:
            self._by_type.clear()
        else:
            self._by_type.pop(event_type, None)
        self._cache.clear()

    def get_subscribers(self, event_type: str | None = None) -> list[Subscriber]:
        """All subscribers, or those an event of ``event_type`` would reach, in call order."""
        if event_type is None:
            return [s for subs in self._by_type.values() for s in subs]
        return list(self._matching(event_type))

    def _matching(self, event_type: str) -> tuple[Subscriber, ...]:
        """Exact-type subscribers, then glob ones (``order.*``), then ``"*"`` ones, each in
        subscription order."""
        found = self._cache.get(event_type)
        if found is None:
            exact = self._by_type.get(event_type, ())
            globs = sorted((s for pattern, subs in self._by_type.items()
                            if is_glob(pattern) and pattern != event_type and type_matches(pattern, event_type)
                            for s in subs), key=_order)
            wild = () if event_type == "*" else self._by_type.get("*", ())
            if len(self._cache) >= _CACHE_MAX:  # many distinct types: start the cache afresh
                self._cache.clear()
            found = self._cache[event_type] = (*exact, *globs, *wild)
        return found

    def has_subscribers(self, event_type: str) -> bool:
        return bool(self._matching(event_type))

    async def dispatch(self, event: Event) -> DispatchResult:
        """Run every matching subscriber in order; never raises."""
        result = DispatchResult(event)
        for sub in self._matching(event.type):
            if sub.is_async and sub.filter is None and not sub.once and not sub.takes_context:
                try:  # the common case, inlined
                    await sub.handler(event)
                    result.delivered += 1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    result.errors.append(DispatchError(sub.id, sub.name, "handler", exc))
            else:
                await self._deliver(sub, event, result)
        return result

    async def dispatch_to(self, subscriber_id: str, event: Event) -> DispatchResult:
        """Run one subscriber on ``event`` (its route's consumer calls this); nothing when it
        was unsubscribed meanwhile (a ``once`` subscriber after its one run) or does not take
        the event's type. Never raises."""
        result = DispatchResult(event)
        for sub in self._matching(event.type):
            if sub.id == subscriber_id:
                await self._deliver(sub, event, result)
                break
        return result

    async def _deliver(self, sub: Subscriber, event: Event, result: DispatchResult) -> None:
        if sub.filter is not None:
            try:
                if not sub.filter(event):
                    return
            except Exception as exc:  # a user filter may raise anything
                result.errors.append(DispatchError(sub.id, sub.name, "filter", exc))
                return
        if sub.once:
            if not await self._claim_once(sub, result):
                return
        args = (event, DispatchContext(sub.id, self, event.type)) if sub.takes_context else (event,)
        try:
            if sub.is_async:
                await sub.handler(*args)
            else:
                await call_in_thread(sub.handler, *args)
            result.delivered += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            result.errors.append(DispatchError(sub.id, sub.name, "handler", exc))

    async def _claim_once(self, sub: Subscriber, result: DispatchResult) -> bool:
        """Remove a once-subscriber and claim it cluster-wide; False if another already ran it."""
        self.unsubscribe(sub.id)
        if self.once_claim is None:
            return True
        try:
            return await self.once_claim(sub.name)
        except Exception as exc:
            # could not claim: do not run (at most once), but report it
            result.errors.append(DispatchError(sub.id, sub.name, "once", exc))
            return False
