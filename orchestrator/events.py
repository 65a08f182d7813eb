"""The event envelope and its wire form.

An event on the stream is three fields: ``id`` (event id), ``type`` and ``body``, where
``body`` is msgpack of the whole envelope::

    {id, type, payload, metadata: {correlation_id, causation_id, source, tags}, published_at}

No pickle anywhere: decoding never runs code that a message chooses. Validation is done
by hand here (not by pydantic) because this is the hot path of every worker; it is
measured in ``benchmarks/`` and checked by the tests in ``tests/unit/core/test_events.py``.
"""

from __future__ import annotations

import fnmatch
import time
import uuid
from collections.abc import Mapping
from typing import Any

import msgpack

from orchestrator.errors import EventDecodeError, InvalidArgumentError

_META_KEYS = ("correlation_id", "causation_id", "source", "tags")
_packb = msgpack.Packer(use_bin_type=True).pack


def new_event_id() -> str:
    """A random UUIDv4 in hex (32 chars): never chosen by the caller, as in tokiwa."""
    return uuid.uuid4().hex


#: characters that make an event type given to ``subscribe`` or a trigger a glob pattern
GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    """Whether ``pattern`` (a subscribed or triggering event type) is a glob such as
    ``order.*`` (``"*"`` alone is the wildcard, matched separately)."""
    return pattern != "*" and any(c in GLOB_CHARS for c in pattern)


def type_matches(pattern: str, event_type: str) -> bool:
    """Whether ``event_type`` matches ``pattern``: equal, ``"*"``, or the glob (``fnmatch``
    rules, case-sensitive: ``*`` matches any characters, dots included; ``?`` one; ``[ab]``
    a set)."""
    if pattern == event_type or pattern == "*":
        return True
    return is_glob(pattern) and fnmatch.fnmatchcase(event_type, pattern)


#: the start of an event id derived from an idempotency key
IDEMPOTENT_PREFIX = "idem-"


def idempotent_event_id(namespace: str, key: str) -> str:
    """The event id of a publish with ``idempotency_key=key``: the same for every publisher
    of the namespace, so the publish-once marker finds a second publish of the key."""
    return IDEMPOTENT_PREFIX + uuid.uuid5(uuid.NAMESPACE_URL, f"tokiwa:{namespace}:idem:{key}").hex


def build_event(type: str, payload: Any, metadata: Mapping[str, Any] | None, *,  # noqa: A002
                key: str | None = None, idempotency_key: str | None = None, namespace: str = "tokiwa") -> Event:
    """An event as ``Orchestrator.publish`` builds it: ``key`` (the ordering key) goes into the
    metadata, ``idempotency_key`` makes the id (:func:`idempotent_event_id`)."""
    meta = metadata
    if key is not None:
        if not isinstance(key, str) or not key.strip():
            raise InvalidArgumentError(f"key must be a non-blank string, got {key!r}")
        meta = {**(meta or {}), "key": key}
    event_id = None
    if idempotency_key is not None:
        if not isinstance(idempotency_key, str) or not idempotency_key.strip():
            raise InvalidArgumentError(f"idempotency_key must be a non-blank string, got {idempotency_key!r}")
        event_id = idempotent_event_id(namespace, idempotency_key)
    return Event(type, payload, meta, id=event_id)


class Event:
    """One published event.

    ``payload`` is anything msgpack can carry (dicts, lists, str, bytes, numbers, None).
    ``metadata`` always has the four keys ``correlation_id``, ``causation_id``, ``source``
    (str or None) and ``tags`` (list of str); extra metadata keys are kept as they are.
    """

    __slots__ = ("id", "type", "payload", "metadata", "published_at", "stream_id", "deliveries", "group", "partition")

    def __init__(
        self,
        type: str,  # noqa: A002 - the public name of the field
        payload: Any = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        id: str | None = None,  # noqa: A002
        published_at: float | None = None,
    ) -> None:
        if not isinstance(type, str) or not type.strip():
            raise InvalidArgumentError(f"event type must be a non-blank string, got {type!r}")
        self.type = type
        self.payload = payload
        self.metadata = normalize_metadata(metadata)
        self.id = id or new_event_id()
        self.published_at = time.time() if published_at is None else float(published_at)
        #: the Redis stream entry id, set when the event was read from (or written to) a stream
        self.stream_id: str | None = None
        #: how many times the stream delivered this entry (1 on first delivery)
        self.deliveries: int = 0
        #: the consumer group (the registration's delivery state) that delivered this entry
        self.group: str | None = None
        #: the partition of the event streams the entry is in (see ``Settings.partitions``)
        self.partition: int = 0

    # -- convenience accessors -------------------------------------------------------
    @property
    def correlation_id(self) -> str | None:
        return self.metadata.get("correlation_id")

    @property
    def causation_id(self) -> str | None:
        return self.metadata.get("causation_id")

    @property
    def source(self) -> str | None:
        return self.metadata.get("source")

    @property
    def key(self) -> str | None:
        """The publisher's explicit ordering key (``publish(..., key=...)``): a chatflow whose
        trigger declares no conversation key takes it as the conversation id."""
        key = self.metadata.get("key")
        return key if isinstance(key, str) else None

    @property
    def tags(self) -> list[str]:
        tags: list[str] = self.metadata.get("tags", [])
        return tags

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "payload": self.payload,
            "metadata": self.metadata,
            "published_at": self.published_at,
        }

    def __repr__(self) -> str:
        return f"Event(type={self.type!r}, id={self.id!r}, stream_id={self.stream_id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


_new_event = object.__new__


def _from_wire(data: dict[str, Any]) -> Event:
    """Build an Event from a decoded body. Hot path: the common, well-formed case is checked
    with plain type tests; anything unusual goes through the full constructor."""
    etype, meta, eid = data["type"], data.get("metadata"), data["id"]
    if (
        type(etype) is str and etype and not etype[0].isspace()
        and type(meta) is dict and len(meta) == 4 and type(meta.get("tags")) is list
        and all(type(t) is str for t in meta["tags"])
        and all(meta.get(k) is None or type(meta[k]) is str for k in ("correlation_id", "causation_id", "source"))
    ):
        event = _new_event(Event)
        event.type = etype
        event.payload = data.get("payload")
        event.metadata = meta
        event.id = eid
        event.published_at = float(data["published_at"])
        event.stream_id = None
        event.deliveries = 0
        event.group = None
        event.partition = 0
        return event
    return Event(etype, data.get("payload"), meta, id=eid, published_at=data["published_at"])


def normalize_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate metadata and fill the four well-known keys."""
    if metadata is None:
        return {"correlation_id": None, "causation_id": None, "source": None, "tags": []}
    if not isinstance(metadata, dict) and not isinstance(metadata, Mapping):
        raise InvalidArgumentError(f"event metadata must be a mapping, got {type(metadata).__name__}")
    meta = dict(metadata)
    for key in ("correlation_id", "causation_id", "source"):
        value = meta.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidArgumentError(f"metadata.{key} must be a string or None, got {value!r}")
        meta.setdefault(key, None)
    tags = meta.get("tags")
    if tags is None:
        meta["tags"] = []
    elif isinstance(tags, (list, tuple)) and all(isinstance(t, str) for t in tags):
        meta["tags"] = list(tags)
    else:
        raise InvalidArgumentError(f"metadata.tags must be a list of strings, got {tags!r}")
    return meta


def encode_fields(event: Event) -> dict[str, bytes | str]:
    """The stream fields of an event: ``{"id", "type", "body"}``."""
    try:
        body = _packb(
            {
                "id": event.id,
                "type": event.type,
                "payload": event.payload,
                "metadata": event.metadata,
                "published_at": event.published_at,
            }
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgumentError(
            f"payload of event {event.type!r} cannot be encoded with msgpack: {exc}"
        ) from exc
    return {"id": event.id, "type": event.type, "body": body}


def decode_fields(
    fields: Mapping[bytes, bytes], *, entry_id: str | None = None, max_bytes: int | None = None
) -> Event:
    """Turn raw stream fields (bytes keys and values) into a validated :class:`Event`.

    Raises :class:`EventDecodeError` with a ``reason`` of ``wrong_fields``, ``oversized``,
    ``undecodable`` or ``invalid_envelope``; the caller dead-letters the entry.
    """
    body = fields.get(b"body")
    if body is None or b"type" not in fields:
        names = sorted(k.decode("utf-8", "replace") for k in fields)
        raise EventDecodeError("wrong_fields", f"entry has fields {names}, expected id, type, body",
                               entry_id=entry_id)
    if max_bytes is not None and len(body) > max_bytes:
        raise EventDecodeError("oversized", f"body is {len(body)} bytes, limit is {max_bytes}",
                               entry_id=entry_id)
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise EventDecodeError("undecodable", f"body is not valid msgpack: {exc}",
                               entry_id=entry_id) from exc
    if not isinstance(data, dict):
        raise EventDecodeError("invalid_envelope", f"body is a {type(data).__name__}, not a map",
                               entry_id=entry_id)
    try:
        event = _from_wire(data)
    except (KeyError, TypeError, ValueError, InvalidArgumentError) as exc:
        raise EventDecodeError("invalid_envelope", f"envelope is invalid: {exc!r}",
                               entry_id=entry_id) from exc
    if not isinstance(event.id, str) or fields.get(b"type", b"").decode("utf-8", "replace") != event.type:
        raise EventDecodeError("wrong_fields", "the entry's type field does not match its body",
                               entry_id=entry_id)
    event.stream_id = entry_id
    return event


def check_conversation_id(conversation_id: Any, *, chatflow: str | None = None) -> str:
    """``conversation_id`` if it is a non-blank string, else InvalidArgumentError (naming the
    chatflow that needs it, when given). The one check every part uses."""
    if not isinstance(conversation_id, str) or not conversation_id.strip():
        if chatflow is not None:
            raise InvalidArgumentError(f"chatflow {chatflow!r} needs a non-blank conversation id, "
                                       f"got {conversation_id!r}")
        raise InvalidArgumentError(f"conversation id must be a non-blank string, got {conversation_id!r}")
    return conversation_id
