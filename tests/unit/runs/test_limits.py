"""Flow-control limits without Redis: how they are written and checked."""

from __future__ import annotations

import pytest

from orchestrator import Node, Orchestrator, Workflow
from orchestrator.errors import InvalidArgumentError
from orchestrator.runs.limits import Limits, parse_rate


@pytest.mark.parametrize(("spec", "parsed"), [("10/s", (10, 1000)), ("100/m", (100, 60_000)),
                                              ("5/10s", (5, 10_000)), ("3 / 250ms", (3, 250)), ("1/h", (1, 3_600_000))])
def test_rates_are_count_per_window(spec, parsed):
    assert parse_rate(spec) == parsed


@pytest.mark.parametrize("spec", ["", "10", "0/s", "10/0s", "ten/s", "10/d", 10])
def test_bad_rates_are_refused_with_the_form_to_use(spec):
    with pytest.raises(InvalidArgumentError, match="N/unit"):
        parse_rate(spec)


def test_limits_from_registration_options_and_their_errors():
    assert Limits.from_options({}) is None
    limits = Limits.from_options({"rate_limit": "50/s", "concurrency_limit": 3, "concurrency_key": "tenant"})
    assert limits.rate == (50, 1000) and limits.concurrency == 3 and limits.concurrency_key == "tenant"
    with pytest.raises(InvalidArgumentError, match="concurrency_limit"):
        Limits.from_options({"concurrency_limit": 0})
    with pytest.raises(InvalidArgumentError, match="need rate_limit"):
        Limits.from_options({"rate_key": "tenant"})


def test_a_bad_limit_fails_at_registration_and_limits_show_in_the_route():
    app = Orchestrator(mode="worker")
    flow = Workflow(name="f", nodes=[Node(name="n", handler=lambda ctx: None)])
    with pytest.raises(InvalidArgumentError):
        app.register_workflow(flow, trigger={"event_type": "x"}, rate_limit="fast")
    app.register_workflow(flow, trigger={"event_type": "x"}, rate_limit="10/s", rate_key="customer.id")
    app.dispatcher.subscribe("x", lambda e: None, name="svc.sub", concurrency_limit=2)
    routes = {r.name: r for r in app.routes()}
    assert routes["wf:f"].limits.rate == (10, 1000) and routes["wf:f"].limits.rate_key == "customer.id"
    assert routes["sub:svc.sub"].limits.concurrency == 2
    assert routes["sub:svc.sub"].advert["limits"]["concurrency"] == 2
