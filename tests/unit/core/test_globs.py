"""Glob event types (``order.*``) in subscriptions, triggers and route adverts."""

from __future__ import annotations

from orchestrator import Event
from orchestrator.dispatcher import EventDispatcher
from orchestrator.events import is_glob, type_matches
from orchestrator.runs.routes import advert_matches, types_advert
from orchestrator.runs.triggers import parse_trigger


def test_type_matches_equal_wildcard_and_globs():
    assert type_matches("order.created", "order.created") and type_matches("*", "anything")
    assert type_matches("order.*", "order.created") and type_matches("order.*", "order.a.b")
    assert not type_matches("order.*", "orders.created") and not type_matches("order.*", "Order.created")
    assert type_matches("order.?", "order.x") and not type_matches("order.?", "order.xy")
    assert type_matches("[ab].done", "a.done") and not type_matches("[ab].done", "c.done")
    assert not is_glob("*") and is_glob("a.*") and not is_glob("plain.type")


async def test_glob_subscribers_run_between_exact_and_wildcard_ones_in_subscription_order():
    d = EventDispatcher()
    calls: list[str] = []
    d.subscribe("*", lambda e: calls.append("wild"))
    d.subscribe("order.*", lambda e: calls.append("glob-1"))
    d.subscribe("order.created", lambda e: calls.append("exact"))
    d.subscribe("o*", lambda e: calls.append("glob-2"))
    d.subscribe("refund.*", lambda e: calls.append("never"))
    result = await d.dispatch(Event("order.created"))
    assert result.ok and calls == ["exact", "glob-1", "glob-2", "wild"]
    assert d.has_subscribers("order.paid") and [s.event_type for s in d.get_subscribers("order.paid")] == [
        "order.*", "o*", "*"]
    calls.clear()
    await d.dispatch(Event("refund.issued"))
    assert calls == ["never", "wild"]


def test_triggers_take_globs_alone_or_in_a_list():
    glob = parse_trigger({"event_type": "order.*"})
    assert glob.kind == "glob" and glob.matches("order.paid") and not glob.matches("refund.paid")
    mixed = parse_trigger({"event_type": ["refund.issued", "order.*"]})
    assert mixed.kind == "glob" and mixed.matches("refund.issued") and mixed.matches("order.x")
    assert not mixed.matches("refund.other")
    assert parse_trigger({"event_type": "order.created"}).kind == "exact"


def test_adverts_carry_globs_so_producers_without_the_code_match_them():
    advert = types_advert(["refund.issued", "order.*"], "glob")
    assert advert_matches(advert, "order.paid") and advert_matches(advert, "refund.issued")
    assert not advert_matches(advert, "refund.other")
