"""Workflow triggers: manual, or event (exact type, list, compiled regex, ``"*"``), with
``filter``, ``map_input``, ``map_context`` and ``map_conversation_id`` (SEED-SEMANTICS §2.3), or
``conversation_key``: the conversation id as a payload path, which publishers without the
app's code can read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import InvalidArgumentError
from orchestrator.events import Event, is_glob, type_matches

_KEYS = {"type", "event_type", "filter", "map_input", "map_context", "map_conversation_id", "conversation_key"}
Mapper = Callable[[Event], Any]


@dataclass(frozen=True, slots=True)
class Trigger:
    """When a registered workflow starts. ``type`` is ``manual`` or ``event``."""

    type: str = "manual"  # noqa: A003
    event_type: str | tuple[str, ...] | re.Pattern[str] | None = None
    filter: Callable[[Event], bool] | None = None  # noqa: A003
    map_input: Mapper | None = None
    map_context: Mapper | None = None
    map_conversation_id: Mapper | None = None
    #: the conversation key as data: a dotted payload path (``"user.id"``) that any publisher
    #: can read without the app's code (see orchestrator.runs.routes)
    conversation_key: str | None = None

    @property
    def kind(self) -> str:
        """``exact``, ``glob`` (a type such as ``order.*``), ``wildcard``, ``regex`` or
        ``manual`` (the order matching uses)."""
        if self.type == "manual":
            return "manual"
        if isinstance(self.event_type, re.Pattern):
            return "regex"
        if self.event_type == "*" or (isinstance(self.event_type, tuple) and "*" in self.event_type):
            return "wildcard"
        if any(is_glob(t) for t in self.exact_types()):
            return "glob"
        return "exact"

    def exact_types(self) -> tuple[str, ...]:
        if isinstance(self.event_type, str):
            return (self.event_type,)
        return self.event_type if isinstance(self.event_type, tuple) else ()

    def matches(self, event_type: str) -> bool:
        kind = self.kind
        if kind == "manual":
            return False
        if kind == "wildcard":
            return True
        if kind == "regex":
            return self.event_type.search(event_type) is not None  # type: ignore[union-attr]
        if kind == "glob":
            return any(type_matches(t, event_type) for t in self.exact_types())
        return event_type in self.exact_types()


def parse_trigger(spec: Any) -> Trigger:
    """Build a Trigger from ``None`` (manual), a Trigger, or a dict such as
    ``{"type": "event", "event_type": "order.created", "map_input": fn}``."""
    if spec is None:
        return Trigger()
    if isinstance(spec, Trigger):
        return spec
    if not isinstance(spec, dict):
        raise InvalidArgumentError(f"trigger must be a dict or Trigger, got {type(spec).__name__}")
    unknown = set(spec) - _KEYS
    if unknown:
        raise InvalidArgumentError(f"unknown trigger keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    kind = spec.get("type", "event" if "event_type" in spec else "manual")
    if kind not in ("manual", "event"):
        raise InvalidArgumentError(f"trigger type must be 'manual' or 'event', got {kind!r}")
    for name in ("filter", "map_input", "map_context", "map_conversation_id"):
        if spec.get(name) is not None and not callable(spec[name]):
            raise InvalidArgumentError(f"trigger {name} must be callable, got {spec[name]!r}")
    event_type = spec.get("event_type")
    if kind == "event":
        event_type = _check_event_type(event_type)
    key = spec.get("conversation_key")
    if key is not None:
        from orchestrator.runs.routes import check_key_path

        key = check_key_path(key)
        if spec.get("map_conversation_id") is not None:
            raise InvalidArgumentError("a trigger takes conversation_key (data) or map_conversation_id (code), not both")
    return Trigger(kind, event_type, spec.get("filter"), spec.get("map_input"), spec.get("map_context"),
                   spec.get("map_conversation_id"), key)


def _check_event_type(value: Any) -> str | tuple[str, ...] | re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return value
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(value)
    raise InvalidArgumentError(
        f"an event trigger needs event_type: a non-blank str, a list of them, a compiled regex or '*'; "
        f"got {value!r}")


def mapped(mapper: Mapper | None, event: Event, default: Any) -> Any:
    """``mapper(event)``, or ``default`` when there is no mapper or it returns None."""
    if mapper is None:
        return default
    value = mapper(event)
    return default if value is None else value
