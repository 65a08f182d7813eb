"""EventDispatcher semantics (tokiwa's: exact then '*', sequential, errors recorded)."""

from __future__ import annotations

import pytest

from orchestrator import Event, EventDispatcher, InvalidArgumentError


async def test_exact_subscribers_run_before_wildcards_in_subscription_order():
    d = EventDispatcher()
    calls = []
    d.subscribe("*", lambda e: calls.append("wild1"))
    d.subscribe("a", lambda e: calls.append("a1"))
    d.subscribe("a", lambda e: calls.append("a2"))
    d.subscribe("*", lambda e: calls.append("wild2"))
    d.subscribe("b", lambda e: calls.append("b"))
    result = await d.dispatch(Event("a"))
    assert calls == ["a1", "a2", "wild1", "wild2"]
    assert result.delivered == 4 and result.ok


async def test_filter_false_skips_and_does_not_consume_once():
    d = EventDispatcher()
    calls = []
    d.subscribe("a", lambda e: calls.append(e.payload), filter=lambda e: e.payload > 1, once=True)
    await d.dispatch(Event("a", 1))
    await d.dispatch(Event("a", 2))
    await d.dispatch(Event("a", 3))
    assert calls == [2]


async def test_failing_filter_and_handler_are_recorded_and_others_still_run():
    d = EventDispatcher()
    calls = []
    d.subscribe("a", lambda e: calls.append("never"), filter=lambda e: 1 / 0)
    d.subscribe("a", lambda e: {}["missing"])
    d.subscribe("a", lambda e: calls.append("ok"))
    result = await d.dispatch(Event("a"))
    assert calls == ["ok"]
    assert [(err.stage, type(err.error)) for err in result.errors] == [
        ("filter", ZeroDivisionError), ("handler", KeyError)]
    assert result.delivered == 1


async def test_once_subscriber_is_removed_even_when_it_fails():
    d = EventDispatcher()
    calls = []

    def flaky(e):
        calls.append(1)
        raise ValueError("x")

    d.subscribe("a", flaky, once=True)
    await d.dispatch(Event("a"))
    await d.dispatch(Event("a"))
    assert calls == [1] and d.get_subscribers() == []


async def test_once_claim_refused_means_the_handler_does_not_run():
    d = EventDispatcher()
    calls = []

    async def refuse(name: str) -> bool:
        calls.append(("claim", name))
        return False

    d.once_claim = refuse
    d.subscribe("a", lambda e: calls.append("ran"), once=True, name="welcome")
    await d.dispatch(Event("a"))
    assert calls == [("claim", "welcome")]


async def test_async_and_context_taking_handlers():
    d = EventDispatcher()
    seen = []

    async def with_ctx(event, ctx):
        seen.append((event.type, ctx.event_type, ctx.dispatcher is d))

    sid = d.subscribe("a", with_ctx)
    await d.dispatch(Event("a"))
    assert seen == [("a", "a", True)] and sid.startswith("sub-")


def test_unsubscribe_clear_and_get_subscribers():
    d = EventDispatcher()
    a = d.subscribe("a", print)
    d.subscribe("*", print)
    d.subscribe("b", print)
    assert [s.event_type for s in d.get_subscribers("a")] == ["a", "*"]
    assert d.unsubscribe(a) is True and d.unsubscribe(a) is False
    d.clear("*")
    assert [s.event_type for s in d.get_subscribers()] == ["b"]
    d.clear()
    assert d.get_subscribers() == []


@pytest.mark.parametrize("bad", ["", " ", None])
def test_blank_type_is_refused(bad):
    with pytest.raises(InvalidArgumentError):
        EventDispatcher().subscribe(bad, print)


def test_non_callable_handler_is_refused():
    with pytest.raises(InvalidArgumentError, match="not callable"):
        EventDispatcher().subscribe("a", "print")


def test_default_name_is_the_qualified_handler_name():
    d = EventDispatcher()
    d.subscribe("a", test_non_callable_handler_is_refused)
    assert d.get_subscribers()[0].name == f"{__name__}.test_non_callable_handler_is_refused"
