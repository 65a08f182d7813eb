"""Reading the {ns}:workers heartbeats hash (orchestrator.ops.heartbeats)."""

from __future__ import annotations

import msgpack

from orchestrator.ops.heartbeats import WorkerBeat, worker_beats


def test_worker_beats_decode_age_and_mark_stale_sorted_by_id():
    entries = {
        b"w2": msgpack.packb({"host": "h", "last_seen": 95.0}),
        "w1": msgpack.packb({"host": "h", "last_seen": 99.0}),
        b"w3": b"\xc1 not msgpack",
        b"w4": msgpack.packb({"host": "h"}),  # no last_seen
        b"w5": msgpack.packb([1, 2]),  # not a map
    }
    beats = worker_beats(entries, now=100.0, stale_after_s=3.0)
    assert [(w.id, w.age_s, w.stale) for w in beats] == [
        ("w1", 1.0, False), ("w2", 5.0, True), ("w3", None, True), ("w4", None, True), ("w5", None, True)]
    assert beats[0] == WorkerBeat("w1", "w1", {"host": "h", "last_seen": 99.0}, 1.0, False)
    assert beats[1].key == b"w2"  # as stored, to delete it
    assert beats[2].fields() == {"error": "undecodable heartbeat"}
    assert beats[1].fields() == {"host": "h", "last_seen": 95.0}


def test_an_undecodable_worker_id_is_shown_with_replacement_characters():
    [beat] = worker_beats({b"w\xff": msgpack.packb({"last_seen": 1.0})}, now=1.0, stale_after_s=3.0)
    assert beat.id == "w\ufffd" and beat.key == b"w\xff"
