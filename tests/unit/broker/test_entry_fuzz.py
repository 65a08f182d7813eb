"""Fuzzing what a worker does with a stream entry before any handler runs: decoding never
raises anything but EventDecodeError, and the dead letter built from any entry stays small
enough for the dead-letter script (Lua's unpack) whatever the entry holds."""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.broker.streams import DEAD_MAX_FIELDS, DEAD_SAMPLE_BYTES, dead_fields
from orchestrator.errors import EventDecodeError
from orchestrator.events import Event, decode_fields, encode_fields

EXTRA = {b"reason": "undecodable", b"error": "x", b"stream_id": "1-1"}

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | st.integers(-2**63, 2**63 - 1), inner, max_size=5),
    max_leaves=20,
)
raw_entries = st.dictionaries(st.binary(max_size=20), st.binary(max_size=200), min_size=1, max_size=60)


def _decode_or_refuse(fields) -> None:
    try:
        decode_fields(fields, entry_id="1-1", max_bytes=1_048_576)
    except EventDecodeError as exc:
        assert exc.reason in ("wrong_fields", "oversized", "undecodable", "invalid_envelope")


@settings(max_examples=300, deadline=None)
@given(raw_entries)
def test_random_fields_are_decoded_or_refused_with_a_reason(fields):
    _decode_or_refuse(fields)


@settings(max_examples=300, deadline=None)
@given(msgpack_values, st.binary(max_size=10))
def test_msgpack_bodies_of_any_shape_are_decoded_or_refused_with_a_reason(value, type_field):
    body = msgpack.packb(value, use_bin_type=True)
    _decode_or_refuse({b"id": b"x", b"type": type_field, b"body": body})


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "type", "payload", "metadata", "published_at", "other"]),
                       msgpack_values, max_size=6))
def test_envelopes_with_wrong_types_are_refused_not_crashed_on(envelope):
    body = msgpack.packb(envelope, use_bin_type=True)
    _decode_or_refuse({b"id": b"x", b"type": b"job", b"body": body})


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20_000), st.integers(0, 3000))
def test_a_dead_letter_of_any_entry_stays_within_the_scripts_bounds(n_fields, value_size):
    fields = {f"f{i}".encode(): b"v" * value_size for i in range(n_fields)}
    flat = dead_fields(fields, EXTRA, max_bytes=1_048_576)
    assert len(flat) <= 2 * (DEAD_MAX_FIELDS + len(EXTRA) + 3)
    whole = n_fields <= DEAD_MAX_FIELDS and n_fields * (value_size + 6) <= 1_048_576
    if not whole:
        assert all(len(x) <= DEAD_SAMPLE_BYTES for x in flat[0:-2 * (len(EXTRA) + 3):2])


def test_a_valid_entry_is_kept_whole_in_its_dead_letter():
    fields = encode_fields(Event("job", {"i": 1}))
    raw = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}
    flat = dead_fields(raw, EXTRA, max_bytes=1_048_576)
    pairs = dict(zip(flat[::2], flat[1::2], strict=True))
    assert pairs[b"body"] == raw[b"body"] and b"truncated" not in pairs
