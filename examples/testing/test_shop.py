"""Testing the shop app with tokiwa's pytest fixtures (``pip install 'tokiwa[test]'``):
``tokiwa`` runs the app of the ``tokiwa_app`` fixture (conftest.py) on a private Redis, in a
fresh namespace per test; ``await tokiwa.drain()`` processes everything published so far."""

import pytest
import shop

pytestmark = pytest.mark.asyncio

ORDER = {"ref": "A-1", "email": "ann@example.com", "items": [{"qty": 2, "price": 5}, {"qty": 1, "price": 7}]}


@pytest.mark.parametrize("tokiwa_backend", ["redis", "fakeredis"])
async def test_an_order_is_confirmed_and_checked_out(tokiwa):
    await shop.app.publish("order.created", ORDER)
    await tokiwa.drain()

    assert tokiwa.published_types() == ["order.created", "invoice.issued"]
    assert tokiwa.published[1].payload == {"ref": "A-1", "total": 17}
    [run] = tokiwa.runs_of("checkout")
    assert run.succeeded and run.output_of("invoice") == {"ref": "A-1", "total": 17}
    assert await tokiwa.redis.lrange(shop.emails_key(), 0, -1) == [b"ann@example.com"]
    assert tokiwa.dead == []


async def test_an_order_without_items_fails_its_checkout(tokiwa):
    await shop.app.publish("order.created", {**ORDER, "items": []})
    await tokiwa.drain()

    [run] = tokiwa.runs
    assert run.status == "failed"
    assert "an order needs items" in run.error["message"]
    assert tokiwa.published_types() == ["order.created"]  # no invoice


async def test_the_reminder_comes_a_day_later(tokiwa):
    await shop.app.publish("order.created", ORDER)
    await tokiwa.drain()
    assert "order.reminder" not in tokiwa.published_types()  # due in a day

    await tokiwa.drain(delayed="all")  # as if the day had passed
    assert tokiwa.published_types()[-1] == "order.reminder"


async def test_a_quote_by_name(tokiwa):
    result = await tokiwa.run_workflow("quote", input={"items": ORDER["items"]})

    assert result.succeeded
    assert result.output_of("quote") == {"total": 17, "with_tax": 19}
    assert [r.run_id for r in tokiwa.runs] == [result.run_id]


async def test_an_order_that_keeps_failing_is_dead_lettered(tokiwa_app_factory):
    # redelivered until max_deliveries, then moved to the dead letters
    t = await tokiwa_app_factory(shop.app, settings={"ack_policy": "on_success", "max_deliveries": 2})
    await shop.app.publish("order.created", {**ORDER, "email": ""})
    await t.drain()

    [dead] = t.dead
    assert dead["group"].endswith("send_confirmation")
    assert dead["event"]["payload"]["ref"] == "A-1"
    assert t.runs_of("checkout")[0].succeeded  # the workflow's route is its own
