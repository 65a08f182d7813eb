"""Routes without Redis: names, adverts, what a producer without the code computes."""

from __future__ import annotations

import re

import pytest

from orchestrator import Event, Node, Orchestrator, Workflow
from orchestrator.errors import InvalidArgumentError
from orchestrator.keys import Keys
from orchestrator.runs.routes import (
    advert_conversation,
    advert_matches,
    check_key_path,
    group_name,
    placement,
    route_of_group,
    types_advert,
    value_at,
)


def test_value_at_reads_dotted_paths_of_strings_and_integers_only():
    payload = {"user": {"id": "u-1", "n": 7, "flag": True, "blank": " "}, "top": "t"}
    assert value_at(payload, "user.id") == "u-1" and value_at(payload, "top") == "t"
    assert value_at(payload, "user.n") == "7"
    assert value_at(payload, "user.flag") is None and value_at(payload, "user.blank") is None
    assert value_at(payload, "user.missing") is None and value_at("not a dict", "a") is None


@pytest.mark.parametrize("bad", ["", " ", "a..b", ".a", 3, None])
def test_a_conversation_key_must_be_a_dotted_path(bad):
    with pytest.raises(InvalidArgumentError, match="dotted payload path"):
        check_key_path(bad)


def test_a_trigger_takes_data_or_code_for_the_conversation_key_not_both():
    app = Orchestrator(mode="producer")
    flow = Workflow(name="c", type="chatflow", nodes=[Node(name="n", handler=lambda ctx: None)])
    with pytest.raises(InvalidArgumentError, match="not both"):
        app.register_workflow(flow, trigger={"event_type": "m", "conversation_key": "c",
                                             "map_conversation_id": lambda e: "x"})


def test_adverts_match_exact_types_wildcards_and_patterns():
    assert advert_matches(types_advert(["a", "b"], "exact"), "b")
    assert not advert_matches(types_advert("a", "exact"), "b")
    assert advert_matches(types_advert("*", "wildcard"), "anything")
    assert advert_matches(types_advert(re.compile(r"^order\."), "regex"), "order.paid")
    assert not advert_matches(types_advert(re.compile(r"^order\."), "regex"), "refund")
    assert not advert_matches({"pattern": "("}, "x")  # a broken pattern matches nothing, never raises


def test_a_producer_without_the_code_computes_the_conversation_from_the_advert():
    path = {"kind": "chatflow", "types": ["m"], "conversation_key": "user.id"}
    assert advert_conversation(path, Event("m", {"user": {"id": "u1"}})) == "u1"
    assert advert_conversation(path, Event("m", {}, {"key": "k9"})) == "k9"  # the explicit key next
    assert advert_conversation({**path, "conversation_key": None, "conversation_id": "fixed"}, Event("m")) == "fixed"
    assert advert_conversation({**path, "conversation_key_code": True}, Event("m", {"user": {"id": "u1"}})) is None


def test_order_lists_cover_every_chatflow_route_that_takes_the_event():
    keys = Keys("ns")
    adverts = {"workers:wf:a": {"kind": "chatflow", "types": ["m"], "conversation_key": "c"},
               "workers:wf:b": {"kind": "chatflow", "wildcard": True, "conversation_key": "c"},
               "workers:wf:plain": {"kind": "workflow", "types": ["m"]},
               "workers:wf:other": {"kind": "chatflow", "types": ["x"], "conversation_key": "c"}}
    where = placement(keys, Event("m", {"c": "c1"}), adverts, {}, 1)
    assert where.partition == 0
    assert where.order_lists == [keys.conversation_order("c1", "workers:wf:a"),
                                 keys.conversation_order("c1", "workers:wf:b")]
    own = {"workers:wf:a": lambda e: "from-code"}  # the app's own chatflow wins over its advert
    assert placement(keys, Event("m", {"c": "c1"}), adverts, own, 1).order_lists[0] == keys.conversation_order(
        "from-code", "workers:wf:a")


def test_an_event_goes_to_the_partition_of_its_key_else_its_conversation_else_its_id():
    from orchestrator.broker.partitions import partition_of

    keys = Keys("ns")
    adverts = {"workers:wf:a": {"kind": "chatflow", "types": ["m"], "conversation_key": "c"}}
    for cid in ("c1", "c2", "c3", "conv-with-a-longer-id"):
        where = placement(keys, Event("m", {"c": cid}), adverts, {}, 7)
        assert where.partition == partition_of(cid, 7)
        assert where.order_lists == [keys.partition(where.partition).conversation_order(cid, "workers:wf:a")]
    keyed = Event("m", {"c": "c1"}, {"key": "tenant-9"})
    assert placement(keys, keyed, adverts, {}, 7).partition == partition_of("tenant-9", 7)
    plain = Event("other")
    assert placement(keys, plain, adverts, {}, 7).partition == partition_of(plain.id, 7)
    spread = {placement(keys, Event("other"), adverts, {}, 4).partition for _ in range(200)}
    assert spread == {0, 1, 2, 3}  # ids spread over every partition


def test_routes_of_an_app_one_per_registration_with_stable_names():
    app = Orchestrator(mode="worker")
    app.dispatcher.subscribe("a", lambda e: None, name="svc.on_a")
    app.dispatcher.subscribe("a", lambda e: None, name="svc.on_a")  # the same name: gets #2
    app.dispatcher.subscribe("*", lambda e: None, name="svc.audit")
    app.register_workflow(Workflow(name="flow", nodes=[Node(name="n", handler=lambda ctx: None)]),
                          trigger={"event_type": "a"})
    names = [r.name for r in app.routes()]
    assert names == ["sub:svc.on_a", "sub:svc.on_a#2", "sub:svc.audit", "wf:flow"]
    assert app.route_groups() == [group_name("workers", n) for n in names]
    assert route_of_group("workers", "workers:wf:flow") == "wf:flow" and route_of_group("workers", "other") is None
    adverts = {r.name: r.advert for r in app.routes()}
    assert adverts["sub:svc.audit"]["wildcard"] is True
    assert adverts["wf:flow"]["types"] == ["a"] and adverts["wf:flow"]["kind"] == "workflow"
