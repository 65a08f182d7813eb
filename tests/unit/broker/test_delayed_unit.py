"""Delayed events without Redis: the stored value's shape, the mover's sleep plan, and the
arguments schedule() refuses before it writes anything."""

from __future__ import annotations

import fakeredis
import pytest

from orchestrator.broker.delayed import DelayedEvents, DelayMover, pack_entry, unpack_entry
from orchestrator.broker.streams import checked_fields
from orchestrator.config import load_settings
from orchestrator.errors import InvalidArgumentError
from orchestrator.events import Event, decode_fields
from orchestrator.keys import Keys


def _delayed(**settings) -> DelayedEvents:
    return DelayedEvents(fakeredis.FakeAsyncRedis(), Keys("ns"), load_settings({"namespace": "ns", **settings}))


def test_a_packed_entry_unpacks_to_the_stream_fields_and_order_lists():
    event = Event("t", {"bytes": b"\x00\xff", "text": "é" * 300, "n": [1, None]}, {"tags": ["a"]})
    fields = checked_fields(event, 1 << 20)
    raw = pack_entry(fields, ["{ns:0}:order:a"])
    got, order = unpack_entry(raw)
    assert order == ["{ns:0}:order:a"]
    assert set(got) == {b"id", b"type", b"body"}
    assert decode_fields(got).to_dict() == event.to_dict()


def test_the_packed_value_uses_no_msgpack_bin_type():
    # Redis's Lua cmsgpack cannot read bin8/16/32 (0xc4-0xc6)
    raw = pack_entry({"id": "x", "type": "t", "body": b"\xc4\xc5\xc6"}, [])
    assert raw[:1] != b"\xc4" and b"\xc4\x03" not in raw


def test_the_mover_sleeps_by_the_head_due_time():
    mover = DelayMover(_delayed(), poll_ms=20, max_sleep_ms=1000)
    assert mover.sleep_ms(None, 5000) == 1000  # nothing scheduled
    assert mover.sleep_ms(5000 + 60_000, 5000) == 1000  # head far away
    assert mover.sleep_ms(5000 + 1000, 5000) == 20  # head within max_sleep: poll
    assert mover.sleep_ms(5000 + 5, 5000) == 6  # head nearer than a poll: sleep until it
    assert mover.sleep_ms(4000, 5000) == 0  # overdue: at once


@pytest.mark.parametrize("kwargs", [{"poll_ms": 0}, {"poll_ms": 50, "max_sleep_ms": 10}, {"batch": 0}])
def test_a_mover_refuses_a_sleep_plan_that_cannot_work(kwargs):
    with pytest.raises(InvalidArgumentError):
        DelayMover(_delayed(), **kwargs)


@pytest.mark.parametrize("due", [-1, 1.5, "10", True, None])
async def test_schedule_refuses_a_due_time_that_is_not_epoch_ms(due):
    with pytest.raises(InvalidArgumentError, match="due_ms"):
        await _delayed().schedule(Event("x"), due)


async def test_schedule_refuses_order_lists_outside_the_namespace():
    with pytest.raises(InvalidArgumentError, match="namespace"):
        await _delayed().schedule(Event("x"), 1, ["{other:0}:order:a"])


async def test_schedule_refuses_an_event_over_max_event_bytes():
    with pytest.raises(InvalidArgumentError, match="max_event_bytes"):
        await _delayed(max_event_bytes=1024).schedule(Event("x", "y" * 5000), 1)


async def test_move_refuses_an_empty_batch():
    with pytest.raises(InvalidArgumentError):
        await _delayed().move_due(limit=0)
