"""The event envelope and its msgpack wire form."""

from __future__ import annotations

import msgpack
import pytest

from orchestrator import Event, EventDecodeError, InvalidArgumentError
from orchestrator.events import decode_fields, encode_fields


def raw(fields: dict) -> dict[bytes, bytes]:
    return {k.encode(): (v if isinstance(v, bytes) else v.encode()) for k, v in fields.items()}


def test_round_trip_keeps_every_envelope_field():
    event = Event("order.created", {"ref": "A-1", "items": [1, 2], "blob": b"\x00\x01"},
                  {"correlation_id": "c", "causation_id": "k", "source": "shop", "tags": ["x"]})
    back = decode_fields(raw(encode_fields(event)), entry_id="1-0")
    assert back.to_dict() == event.to_dict()
    assert back.stream_id == "1-0"


def test_ids_are_generated_and_unique():
    assert len({Event("t").id for _ in range(1000)}) == 1000


def test_metadata_defaults_are_filled():
    assert Event("t").metadata == {"correlation_id": None, "causation_id": None, "source": None, "tags": []}


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_blank_or_non_string_type_is_refused(bad):
    with pytest.raises(InvalidArgumentError, match="non-blank"):
        Event(bad)


@pytest.mark.parametrize("meta", [{"tags": "a"}, {"tags": [1]}, {"source": 5}, "nope"])
def test_invalid_metadata_is_refused(meta):
    with pytest.raises(InvalidArgumentError, match="metadata"):
        Event("t", None, meta)


def test_payload_msgpack_cannot_carry_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match="msgpack"):
        encode_fields(Event("t", {"when": object()}))


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"type": "t"}, "wrong_fields"),
        ({"type": "t", "body": b"\xc1"}, "undecodable"),
        ({"type": "t", "body": msgpack.packb("str")}, "invalid_envelope"),
        ({"type": "t", "body": msgpack.packb({"type": "t"})}, "invalid_envelope"),
        ({"type": "t", "body": msgpack.packb({"id": "i", "type": "", "published_at": 1})}, "invalid_envelope"),
        ({"type": "u", "body": msgpack.packb({"id": "i", "type": "t", "published_at": 1})}, "wrong_fields"),
    ],
)
def test_bad_entries_raise_decode_errors_with_a_reason(fields, reason):
    with pytest.raises(EventDecodeError) as info:
        decode_fields(raw(fields), entry_id="9-9")
    assert info.value.reason == reason and info.value.entry_id == "9-9"


def test_body_over_the_limit_is_oversized():
    fields = raw(encode_fields(Event("t", "x" * 5000)))
    with pytest.raises(EventDecodeError) as info:
        decode_fields(fields, max_bytes=1000)
    assert info.value.reason == "oversized"


def test_decoding_never_unpickles():
    import pickle

    fields = {b"type": b"t", b"body": pickle.dumps({"id": "x"})}
    with pytest.raises(EventDecodeError):
        decode_fields(fields)
