"""One suite over every conversation store (the Redis one on the real redis-server fixture),
plus the behaviours specific to the delta file store and the Redis store."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis

from orchestrator.chat.conversations import (
    DeltaConversationStore,
    InMemoryConversationStore,
    RedisConversationStore,
)
from orchestrator.errors import FencingError, InvalidArgumentError, StateError
from orchestrator.keys import Keys


@pytest.fixture
async def aredis(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "delta", "redis"])
async def store(request, tmp_path, aredis, namespace):
    if request.param == "memory":
        return InMemoryConversationStore()
    if request.param == "delta":
        return DeltaConversationStore(tmp_path / "conv", compact_after=3)
    return RedisConversationStore(aredis, Keys(namespace), compact_after=3)


async def test_an_unknown_conversation_has_empty_memory(store):
    assert await store.get("nobody") == {}


async def test_set_then_get_returns_the_memory(store):
    await store.set("c1", {"name": "Aki", "turns": [1, 2], "meta": {"lang": "ja"}})
    assert await store.get("c1") == {"name": "Aki", "turns": [1, 2], "meta": {"lang": "ja"}}


async def test_later_sets_replace_changed_keys_and_drop_removed_ones(store):
    await store.set("c1", {"a": 1, "b": 2, "c": 3})
    await store.set("c1", {"a": 1, "b": 20, "d": 4})
    assert await store.get("c1") == {"a": 1, "b": 20, "d": 4}


async def test_many_sets_across_compactions_keep_the_latest_memory(store):
    for i in range(10):
        await store.set("c1", {"count": i, f"k{i}": i, **({"keep": True} if i % 2 else {})})
    assert await store.get("c1") == {"count": 9, "k9": 9, "keep": True}


async def test_conversations_do_not_see_each_other(store):
    await store.set("c1", {"who": 1})
    await store.set("c2", {"who": 2})
    assert (await store.get("c1"), await store.get("c2")) == ({"who": 1}, {"who": 2})


async def test_the_returned_memory_is_a_copy(store):
    await store.set("c1", {"items": [1]})
    got = await store.get("c1")
    got["items"].append(2)
    assert await store.get("c1") == {"items": [1]}


async def test_delete_forgets_a_conversation(store):
    await store.set("c1", {"a": 1})
    assert await store.delete("c1") is True
    assert await store.get("c1") == {}
    assert await store.delete("c1") is False


async def test_a_redelivered_event_id_applies_its_delta_once(store):
    await store.set("c1", {"n": 1}, event_id="e1")
    assert await store.set("c1", {"n": 2}, event_id="e2") is True
    assert await store.set("c1", {"n": 3}, event_id="e2") is False
    assert await store.get("c1") == {"n": 2}


async def test_a_write_with_an_older_fencing_token_is_refused(store):
    await store.set("c1", {"by": "holder-5"}, fencing_token=5)
    with pytest.raises(FencingError, match="stale"):
        await store.set("c1", {"by": "holder-4"}, fencing_token=4)
    assert await store.get("c1") == {"by": "holder-5"}


async def test_a_newer_or_equal_fencing_token_may_write(store):
    await store.set("c1", {"v": 1}, fencing_token=5)
    await store.set("c1", {"v": 2}, fencing_token=5)
    await store.set("c1", {"v": 3}, fencing_token=6)
    assert await store.get("c1") == {"v": 3}


@pytest.mark.parametrize("bad", ["", "  ", None, 3])
async def test_a_blank_conversation_id_is_refused(store, bad):
    with pytest.raises(InvalidArgumentError):
        await store.get(bad)


@pytest.mark.parametrize("bad", [["a"], "text", {1: "x"}])
async def test_memory_must_be_a_dict_with_string_keys(store, bad):
    with pytest.raises(InvalidArgumentError):
        await store.set("c1", bad)


# -- DeltaConversationStore ------------------------------------------------------------------
async def test_delta_store_writes_a_base_then_appends_shallow_diffs(tmp_path):
    store = DeltaConversationStore(tmp_path, compact_after=50)
    await store.set("c1", {"a": 1, "b": 2})
    await store.set("c1", {"a": 1, "c": 3})
    folder = tmp_path / "c1"
    assert json.loads((folder / "base.json").read_text()) == {"a": 1, "b": 2}
    [line] = (folder / "deltas.jsonl").read_text().splitlines()
    assert json.loads(line)["diff"] == {"set": {"c": 3}, "remove": ["b"]}
    assert "timestamp" in json.loads(line)


async def test_delta_store_appends_nothing_for_an_unchanged_memory(tmp_path):
    store = DeltaConversationStore(tmp_path)
    await store.set("c1", {"a": 1})
    await store.set("c1", {"a": 1})
    assert (tmp_path / "c1" / "deltas.jsonl").read_text() == ""


async def test_delta_store_compacts_into_the_base_after_n_deltas(tmp_path):
    store = DeltaConversationStore(tmp_path, compact_after=3)
    for i in range(4):
        await store.set("c1", {"i": i})
    folder = tmp_path / "c1"
    assert json.loads((folder / "base.json").read_text()) == {"i": 3}
    assert (folder / "deltas.jsonl").read_text() == ""


async def test_delta_store_reloads_from_disk_in_a_new_instance(tmp_path):
    first = DeltaConversationStore(tmp_path, compact_after=3)
    for i in range(5):
        await first.set("c1", {"i": i, "hist": list(range(i))}, event_id=f"e{i}")
    second = DeltaConversationStore(tmp_path, compact_after=3)
    assert await second.get("c1") == {"i": 4, "hist": [0, 1, 2, 3]}
    assert await second.set("c1", {"i": 99}, event_id="e4") is False


async def test_delta_store_compacts_on_get_when_already_over_the_limit(tmp_path):
    await (writer := DeltaConversationStore(tmp_path, compact_after=50)).set("c1", {"i": 0})
    for i in range(1, 4):
        await writer.set("c1", {"i": i})
    reader = DeltaConversationStore(tmp_path, compact_after=2)
    assert await reader.get("c1") == {"i": 3}
    assert (tmp_path / "c1" / "deltas.jsonl").read_text() == ""


async def test_delta_store_refuses_deltas_without_a_base(tmp_path):
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / "deltas.jsonl").write_text('{"diff": {"set": {"a": 1}, "remove": []}}\n')
    with pytest.raises(StateError, match="no base.json"):
        await DeltaConversationStore(tmp_path).get("c1")


async def test_delta_store_keeps_odd_conversation_ids_inside_its_directory(tmp_path):
    store = DeltaConversationStore(tmp_path / "conv")
    await store.set("../escape/x", {"a": 1})
    assert await store.get("../escape/x") == {"a": 1}
    assert [p.parent for p in (tmp_path / "conv").iterdir()] == [tmp_path / "conv"]
    with pytest.raises(InvalidArgumentError):
        await store.set("..", {"a": 1})


def test_compact_after_must_be_at_least_one(tmp_path):
    with pytest.raises(InvalidArgumentError):
        DeltaConversationStore(tmp_path, compact_after=0)


# -- RedisConversationStore ------------------------------------------------------------------
async def test_redis_store_keeps_at_most_n_minus_one_deltas(aredis, namespace):
    keys = Keys(namespace)
    store = RedisConversationStore(aredis, keys, compact_after=4)
    for i in range(10):
        await store.set("c1", {"i": i})
    assert await aredis.llen(keys.conversation_deltas("c1")) == 10 % 4
    assert await store.get("c1") == {"i": 9}


async def test_redis_store_refuses_a_token_older_than_the_lock_epoch(aredis, namespace):
    keys = Keys(namespace)
    store = RedisConversationStore(aredis, keys)
    await aredis.set(keys.conversation_lock_epoch("c1"), 7)
    with pytest.raises(FencingError):
        await store.apply_delta("c1", {"set": {"a": 1}}, event_id="e1", fencing_token=6)
    assert await store.get("c1") == {}
    assert await store.apply_delta("c1", {"set": {"a": 1}}, event_id="e1", fencing_token=7) is True


async def test_redis_store_apply_delta_dedupes_event_ids_after_compaction(aredis, namespace):
    store = RedisConversationStore(aredis, Keys(namespace), compact_after=2)
    for i in range(5):
        await store.apply_delta("c1", {"set": {f"k{i}": i}}, event_id=f"e{i}")
    assert await store.apply_delta("c1", {"set": {"k0": "again"}}, event_id="e0") is False
    assert await store.get("c1") == {f"k{i}": i for i in range(5)}


async def test_redis_store_snapshot_is_readable_field_by_field(aredis, namespace):
    keys = Keys(namespace)
    store = RedisConversationStore(aredis, keys, compact_after=1)
    await store.set("c1", {"name": "Aki", "empty": {}, "bin": b"\x00\x01"})
    fields = await aredis.hkeys(keys.conversation("c1"))
    assert {b"m:name", b"m:empty", b"m:bin"} <= set(fields)
    assert await store.get("c1") == {"name": "Aki", "empty": {}, "bin": b"\x00\x01"}
