"""An app's place in the fleet: its routes, their declaration in Redis, and what it learns of
the routes other workers declared (to order conversations and call workflows by name).

The delivery model itself is described in :mod:`orchestrator.runs.routes`; this is the part
that holds one app's view of it. It does not know the app: it uses what :class:`FleetHost`
lists, plus the app's subscriber step and added processors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from orchestrator import faults
from orchestrator.broker.groups import declare_groups
from orchestrator.broker.partitions import Placement
from orchestrator.config import Settings
from orchestrator.errors import NotFoundError
from orchestrator.events import Event
from orchestrator.keys import Keys
from orchestrator.runs.registry import RunTarget, WorkflowRegistry
from orchestrator.runs.routes import (
    CHATFLOW,
    PROCESSOR,
    WORKFLOW,
    ProcessStep,
    Route,
    RouteBook,
    encode_advert,
    placement,
    subscriber_routes,
)

log = logging.getLogger("tokiwa.routes")


class FleetHost(Protocol):
    """What the fleet view reads of the app, at each use (``configure()`` replaces settings)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def keys(self) -> Keys: ...
    @property
    def source(self) -> str | None: ...
    @property
    def dispatcher(self) -> Any: ...
    @property
    def workflows(self) -> WorkflowRegistry: ...
    @property
    def redis(self) -> Any: ...
    async def workers(self) -> dict[str, dict[str, Any]]: ...


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', 'anon')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


class Fleet:
    """One app's routes and its view of the fleet's."""

    def __init__(self, host: FleetHost, subscriber_step: Callable[[Any], ProcessStep],
                 processors: list[Callable[[Event], Awaitable[Any]]]) -> None:
        self.host = host
        self.subscriber_step = subscriber_step
        self.processors = processors  # the app's added processors (each a route), shared list
        self._book: RouteBook | None = None

    @property
    def book(self) -> RouteBook:
        """The routes declared in Redis, as this process last read them."""
        keys = self.host.keys
        if self._book is None or self._book.keys != keys:
            self._book = RouteBook(keys, self.host.settings.group)
        return self._book

    def routes(self) -> list[Route]:
        """One route per subscriber, per registered workflow and per added processor."""
        out = subscriber_routes(self.host.dispatcher, self.subscriber_step)
        out += self.host.workflows.routes()
        for proc in self.processors:
            name = _qualname(proc)
            out.append(Route(f"proc:{name}", PROCESSOR, proc, {"kind": PROCESSOR, "name": name, "wildcard": True}))
        return out

    def groups(self) -> list[str]:
        return [r.group(self.host.settings.group) for r in self.routes()]

    async def declare(self) -> list[str]:
        """Create the missing groups of the routes and write their adverts to ``{ns}:routes``;
        returns the groups created. The adverts are best effort: a full Redis refuses them,
        and the worker starts anyway (its groups exist)."""
        redis, keys, prefix = self.host.redis, self.host.keys, self.host.settings.group
        routes = {r.group(prefix): r for r in self.routes()}
        created: list[str] = []
        for part in keys.partitions(self.host.settings.partitions):
            created += [g for g in await declare_groups(redis, part.events, routes, prefix) if g not in created]
        if not routes:
            return created
        now, source = time.time(), self.host.source
        adverts = {g: encode_advert({**r.advert, "route": r.name, "group": g, "declared_at": now, "source": source})
                   for g, r in routes.items()}
        try:
            await redis.hset(keys.routes, mapping=adverts)
        except Exception as exc:
            if not faults.is_transient(exc):
                raise
            log.warning("could not write the route adverts to %s (%s); producers without the app will not "
                        "know these routes until a worker writes them", keys.routes, faults.describe(exc))
        return created

    async def remote_workflow(self, ref: str) -> RunTarget:
        """A workflow this app does not register, by name or id, from the routes workers
        declared; NotFoundError naming what live workers offer when no route has it."""
        adverts = await self.book.refresh(self.host.redis, force=True)
        live = await self.offers()
        for advert in adverts.values():
            if advert.get("kind") in (WORKFLOW, CHATFLOW) and ref in (advert.get("name"), advert.get("workflow_id")):
                target = RunTarget(str(advert["workflow_id"]), str(advert["name"]), str(advert["kind"]))
                if not any(target.name in names for names in live.values()):
                    log.warning("no live worker offers workflow %r now; the request waits for one", target.name)
                return target
        offered = sorted({n for names in live.values() for n in names})
        raise NotFoundError(f"no worker offers a workflow {ref!r}; live workers offer: "
                            f"{', '.join(offered) if offered else 'nothing (no live worker)'}")

    async def offers(self) -> dict[str, list[str]]:
        """Worker id -> the workflow names its heartbeat says it runs (live workers only)."""
        return {wid: list(beat.get("workflows") or []) for wid, beat in (await self.host.workers()).items()}

    async def placement(self, event: Event) -> Placement:
        """Where ``event`` is published: its partition, and the conversation order lists it
        joins there (its chatflow routes: this app's and those workers declared)."""
        return self.placement_now(event, await self.book.refresh(self.host.redis))

    def placement_now(self, event: Event, adverts: Mapping[str, Mapping[str, Any]]) -> Placement:
        return placement(self.host.keys, event, adverts, self.host.workflows.order_fns(),
                         self.host.settings.partitions)
