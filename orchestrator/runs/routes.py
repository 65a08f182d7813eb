"""Routes: the delivery model. Each registration is one route with its own consumer group.

A route is what one registration does with an event: a subscriber (``sub:{name}``), a
registered workflow or chatflow (``wf:{workflow name}``), or a processor added with
``add_processor`` (``proc:{name}``). Each route reads the events stream through its own
consumer group ``{group prefix}:{route}`` (Redis streams' own fan-out), so:

- an event is acked for a route only by a worker that has that route: a worker that lacks a
  workflow never sees its group, and the events wait there (the group's lag) until a worker
  that has it runs; nothing is swallowed during a rolling deploy;
- each route's delivery state (pending, deliveries, dead letters, redelivery) is its own:
  a failure of one workflow under ``ack_policy="on_success"`` redelivers that workflow's
  entry only, never the other routes' work on the same event.

Routes are declared in Redis (``{ns}:routes``: group -> msgpack advert) by every worker, and
every producer with the app, that has them. The advert is data that any publisher can use
without the code: the event types the route listens to, and for a chatflow the payload path
of its conversation key, so a producer that never imports the app still records each
conversation's publish order (see :class:`RouteBook`).

A new route's group starts at the stream's end (``$``): a workflow added in a deploy runs
for events published after it was first declared. The exception is a stream that has no
group yet: the groups are then created from ``0``, so events published before any worker
ever started are processed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from orchestrator.broker.partitions import Placement, partition_key, partition_of
from orchestrator.errors import InvalidArgumentError
from orchestrator.events import Event, type_matches
from orchestrator.keys import Keys
from orchestrator.runs.outcome import ProcessResult

log = logging.getLogger("tokiwa.routes")

#: route kinds, as adverts carry them
SUBSCRIBER, WORKFLOW, CHATFLOW, PROCESSOR = "subscriber", "workflow", "chatflow", "processor"
#: seconds a producer trusts its copy of ``{ns}:routes`` before reading it again
ROUTE_BOOK_TTL_S = 2.0

ProcessStep = Callable[[Event], Awaitable[ProcessResult]]


@dataclass(slots=True)
class Route:
    """One registration's delivery: its name (``sub:…``, ``wf:…``, ``proc:…``), what it does
    with an event, and its advert (plain data, written to ``{ns}:routes``)."""

    name: str
    kind: str
    process: ProcessStep
    advert: dict[str, Any] = field(default_factory=dict)
    #: flow control (:class:`orchestrator.runs.limits.Limits`), None without limits
    limits: Any = None

    def group(self, prefix: str) -> str:
        return group_name(prefix, self.name)


def subscriber_routes(dispatcher: Any, step: Callable[[Any], ProcessStep]) -> list[Route]:
    """One route per subscriber of ``dispatcher`` (``sub:{name}``; a second subscriber of the
    same name gets ``#2``: give subscribers a ``name=`` to keep their delivery state stable
    across deploys). ``step(subscriber)`` gives what the route does with an event."""
    out: list[Route] = []
    seen: dict[str, int] = {}
    for sub in dispatcher.get_subscribers():
        name = f"sub:{sub.name}"
        seen[name] = n = seen.get(name, 0) + 1
        if n > 1:
            name = f"{name}#{n}"
        from orchestrator.runs.limits import Limits

        kind = "wildcard" if sub.event_type == "*" else "exact"
        limits = Limits.from_options(sub.limits)
        out.append(Route(name, SUBSCRIBER, step(sub),
                         {"kind": SUBSCRIBER, "name": sub.name, **types_advert(sub.event_type, kind),
                          "limits": limits.describe() if limits else None}, limits))
    return out


def group_name(prefix: str, route: str) -> str:
    """The consumer group of ``route``: ``{prefix}:{route}`` (prefix = ``Settings.group``)."""
    return f"{prefix}:{route}"


def route_of_group(prefix: str, group: str) -> str | None:
    """The route name inside a group name, None for a group that is not a route's."""
    head = f"{prefix}:"
    return group[len(head):] if group.startswith(head) else None


def check_key_path(path: Any) -> str:
    """A conversation key path: dotted names into the payload (``"user.id"``)."""
    if not isinstance(path, str) or not path.strip() or any(not part for part in path.split(".")):
        raise InvalidArgumentError(f"conversation_key must be a dotted payload path such as 'user.id', got {path!r}")
    return path


def value_at(payload: Any, path: str) -> str | None:
    """The string (or integer, as a string) at ``path`` in ``payload``; None when absent."""
    node = payload
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or node is None:
        return None
    if isinstance(node, int):
        return str(node)
    return node if isinstance(node, str) and node.strip() else None


def types_advert(event_type: Any, kind: str) -> dict[str, Any]:
    """How a route's event types are written in its advert: ``types`` (exact), ``wildcard``
    (every event) or ``pattern`` (a regex searched in the type)."""
    if kind == "wildcard":
        return {"types": [], "wildcard": True, "pattern": None}
    if kind == "regex":
        return {"types": [], "wildcard": False, "pattern": event_type.pattern}
    if kind == "manual":
        return {"types": [], "wildcard": False, "pattern": None}
    types = [event_type] if isinstance(event_type, str) else list(event_type or ())
    return {"types": types, "wildcard": "*" in types, "pattern": None}  # types may hold globs


def advert_matches(advert: Mapping[str, Any], event_type: str) -> bool:
    """Whether a route, by its advert, listens to ``event_type`` (filters aside: a filter is
    code, which only workers run)."""
    if advert.get("wildcard"):
        return True
    if any(type_matches(str(t), event_type) for t in advert.get("types") or ()):
        return True
    pattern = advert.get("pattern")
    if pattern:
        try:
            return re.search(pattern, event_type) is not None
        except re.error:
            return False
    return False


def encode_advert(advert: Mapping[str, Any]) -> bytes:
    blob: bytes = msgpack.packb(dict(advert), default=str)
    return blob


def decode_advert(blob: Any) -> dict[str, Any] | None:
    """A stored advert, None for one that does not decode (it is then ignored, not fatal)."""
    try:
        value = msgpack.unpackb(blob, raw=False)
    except Exception:
        return None
    return value if isinstance(value, dict) else None


class RouteBook:
    """A producer's view of the routes declared in Redis: read from ``{ns}:routes`` at most
    every :data:`ROUTE_BOOK_TTL_S`, merged under the app's own routes (which win). Used to
    compute, without the workers' code, which conversation order lists an event joins and
    which workflow a name means."""

    def __init__(self, keys: Keys, group_prefix: str, *, ttl_s: float = ROUTE_BOOK_TTL_S) -> None:
        self.keys, self.prefix, self.ttl_s = keys, group_prefix, ttl_s
        self._adverts: dict[str, dict[str, Any]] = {}
        self._read_at = float("-inf")

    @property
    def adverts(self) -> dict[str, dict[str, Any]]:
        """group -> advert, as last read."""
        return self._adverts

    def fresh(self) -> bool:
        return time.monotonic() - self._read_at < self.ttl_s

    async def refresh(self, redis: Any, *, force: bool = False) -> dict[str, dict[str, Any]]:
        if force or not self.fresh():
            raw = await redis.hgetall(self.keys.routes)
            adverts = {}
            for group, blob in raw.items():
                advert = decode_advert(blob)
                if advert is not None:
                    adverts[group.decode() if isinstance(group, bytes) else str(group)] = advert
            self._adverts = adverts
            self._read_at = time.monotonic()
        return self._adverts

    def refresh_sync(self, redis: Any) -> dict[str, dict[str, Any]]:
        """:meth:`refresh` with a synchronous client."""
        if not self.fresh():
            raw = redis.hgetall(self.keys.routes)
            self._adverts = {
                (g.decode() if isinstance(g, bytes) else str(g)): a
                for g, a in ((g, decode_advert(b)) for g, b in raw.items()) if a is not None
            }
            self._read_at = time.monotonic()
        return self._adverts


def advert_conversation(advert: Mapping[str, Any], event: Event) -> str | None:
    """A chatflow's conversation id for ``event`` as a producer without the code computes it:
    the declared payload path, else the event's explicit ``key``, else the registration's
    fixed ``conversation_id``; None when the id comes from code (a ``map_conversation_id``)."""
    if advert.get("conversation_key_code"):
        return None
    path = advert.get("conversation_key")
    cid = value_at(event.payload, path) if isinstance(path, str) and path else None
    fixed = advert.get("conversation_id")
    return cid or event.key or (fixed if isinstance(fixed, str) and fixed.strip() else None)


def conversations(event: Event, adverts: Mapping[str, Mapping[str, Any]],
                  own: Mapping[str, Callable[[Event], str | None]]) -> list[tuple[str, str]]:
    """The (conversation id, chatflow group) pairs ``event`` joins: one per chatflow route that
    listens to its type and whose conversation id is known at publish time. ``own`` maps the
    groups of the app's own chatflows to a function computing the id (the app's mappers run
    there); for the others the advert's ``conversation_key`` path (else the event's explicit
    ``key``) gives it. A chatflow route whose key is code the producer lacks is counted by
    workers as unordered (see the docs)."""
    out: list[tuple[str, str]] = []
    for group, fn in own.items():
        cid = fn(event)
        if cid:
            out.append((cid, group))
    for group, advert in adverts.items():
        if group in own or advert.get("kind") != CHATFLOW or not advert_matches(advert, event.type):
            continue
        cid = advert_conversation(advert, event)
        if cid:
            out.append((cid, group))
    return out


def placement(keys: Keys, event: Event, adverts: Mapping[str, Mapping[str, Any]],
              own: Mapping[str, Callable[[Event], str | None]], partitions: int) -> Placement:
    """The partition ``event`` goes to (:mod:`orchestrator.broker.partitions`) and the
    conversation order lists there that its stream id joins."""
    pairs = conversations(event, adverts, own)
    p = partition_of(partition_key(event, [cid for cid, _ in pairs]), partitions)
    part = keys.partition(p)
    return Placement(p, [part.conversation_order(cid, group) for cid, group in pairs])
