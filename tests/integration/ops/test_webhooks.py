"""Webhooks: settings, body, signature, retries and never blocking a run (a local aiohttp receiver)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from orchestrator.errors import ConfigError
from orchestrator.ops.webhooks import (
    SIGNATURE_HEADER,
    WebhookNotifier,
    WebhookSettings,
    build_body,
    load_webhook_settings,
    sign,
    verify,
)
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.runner import Runner


class Receiver:
    """A local HTTP server recording every POST; ``answers`` lists the status codes to give
    (the last one repeats); ``hang`` makes it never answer."""

    def __init__(self, answers=(200,), hang: bool = False) -> None:
        self.answers = list(answers)
        self.hang = hang
        self.requests: list[tuple[dict, bytes]] = []
        self.arrived = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        self.arrived.set()
        if self.hang:
            await asyncio.sleep(3600)
        status = self.answers[min(len(self.requests), len(self.answers)) - 1]
        return web.Response(status=status, text="ok")

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


async def no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


def ok(ctx):
    return "done"


def boom(ctx):
    raise ValueError("card declined")


def notifier(url: str, **kw) -> WebhookNotifier:
    return WebhookNotifier(WebhookSettings(url=url, **kw), sleep=no_sleep)


# -- settings ------------------------------------------------------------------------------------
def test_settings_are_read_from_tokiwa_webhook_variables():
    s = load_webhook_settings({"TOKIWA_WEBHOOK_URL": "https://hooks.example/x",
                               "TOKIWA_WEBHOOK_EVENTS": "run.failed, run.cancelled",
                               "TOKIWA_WEBHOOK_TIMEOUT_S": "1.5", "TOKIWA_WEBHOOK_RETRIES": "5",
                               "TOKIWA_WEBHOOK_SECRET": "s3cret"})
    assert (s.url, s.events, s.timeout_s, s.retries, s.secret) == (
        "https://hooks.example/x", frozenset({"run.failed", "run.cancelled"}), 1.5, 5, "s3cret")


def test_webhooks_are_off_without_a_url_and_send_every_event_by_default():
    s = load_webhook_settings({})
    assert not s.enabled
    assert s.events == frozenset({"run.completed", "run.failed", "run.timed_out", "run.cancelled"})


@pytest.mark.parametrize(("var", "value"), [
    ("TOKIWA_WEBHOOK_EVENTS", "run.started"),
    ("TOKIWA_WEBHOOK_URL", "ftp://x"),
    ("TOKIWA_WEBHOOK_TIMEOUT_S", "0"),
    ("TOKIWA_WEBHOOK_RETRIES", "-1"),
])
def test_a_bad_setting_is_a_config_error_naming_the_variable(var, value):
    with pytest.raises(ConfigError, match=var):
        load_webhook_settings({"TOKIWA_WEBHOOK_URL": "http://h/x", var: value})


def test_a_signature_covers_the_timestamp_and_the_body_and_old_ones_are_refused():
    now = 1_800_000_000
    signature = sign("k", b'{"a":1}', now)
    assert signature == "sha256=" + __import__("hmac").new(b"k", b'1800000000.{"a":1}', "sha256").hexdigest()
    assert verify("k", b'{"a":1}', signature, str(now), now=now + 10)
    assert not verify("k", b'{"a":2}', signature, now, now=now)
    assert not verify("k", b'{"a":1}', signature, now + 1, now=now), "the timestamp is signed"
    assert not verify("k", b'{"a":1}', signature, now, now=now + 301), "a replay past the window"
    assert verify("k", b'{"a":1}', signature, now, now=now + 3000, window_s=3600)
    assert not verify("k", b'{"a":1}', signature, "not-a-time", now=now)


# -- delivery ------------------------------------------------------------------------------------
async def test_a_failed_run_posts_its_body_with_a_valid_signature():
    async with Receiver() as rx:
        hooks = notifier(rx.url, secret="topsecret")
        wf = Workflow("pay", [Node("charge", boom)])
        result = await Runner(hooks=hooks).run(wf, run_id="run-1")
        await hooks.wait(5)
        await hooks.stop()
    assert len(rx.requests) == 1
    headers, raw = rx.requests[0]
    assert verify("topsecret", raw, headers[SIGNATURE_HEADER], headers["X-Tokiwa-Timestamp"])
    body = json.loads(raw)
    assert body["event"] == "run.failed" and headers["X-Tokiwa-Event"] == "run.failed"
    assert (body["run_id"], body["workflow"], body["workflow_id"], body["status"]) == (
        "run-1", "pay", wf.id, "failed")
    assert body["nodes"]["charge"]["status"] == "failed"
    assert body["nodes"]["charge"]["error"]["message"] == "card declined"
    assert body["duration_ms"] == result.duration_ms and body["ended_at"] == result.finished_at
    assert body["error"] is not None


async def test_a_completed_run_posts_run_completed_without_a_signature_when_no_secret():
    async with Receiver() as rx:
        hooks = notifier(rx.url)
        await Runner(hooks=hooks).run(Workflow("ok", [Node("a", ok)]))
        await hooks.wait(5)
        await hooks.stop()
    headers, raw = rx.requests[0]
    assert json.loads(raw)["event"] == "run.completed"
    assert SIGNATURE_HEADER not in headers


async def test_a_delivery_is_retried_after_a_500_with_backoff():
    pauses: list[float] = []

    async def record_sleep(seconds: float) -> None:
        pauses.append(seconds)

    async with Receiver(answers=(500, 500, 200)) as rx:
        hooks = WebhookNotifier(WebhookSettings(url=rx.url, retries=3, backoff_s=0.5), sleep=record_sleep)
        await Runner(hooks=hooks).run(Workflow("ok", [Node("a", ok)]))
        await hooks.wait(5)
        await hooks.stop()
    assert len(rx.requests) == 3
    assert pauses == [0.5, 1.0]
    assert hooks.stats["sent"] == 1 and hooks.stats["failed"] == 0
    delivery_ids = {h["X-Tokiwa-Delivery"] for h, _ in rx.requests}
    assert len(delivery_ids) == 1, "retries of one delivery share its delivery id"


async def test_a_4xx_answer_is_final_and_not_retried():
    async with Receiver(answers=(410,)) as rx:
        hooks = notifier(rx.url, retries=3)
        await Runner(hooks=hooks).run(Workflow("ok", [Node("a", ok)]))
        await hooks.wait(5)
        await hooks.stop()
    assert len(rx.requests) == 1
    assert hooks.stats["failed"] == 1


async def test_delivery_gives_up_after_retries_plus_one_attempts():
    async with Receiver(answers=(503,)) as rx:
        hooks = notifier(rx.url, retries=2)
        await Runner(hooks=hooks).run(Workflow("ok", [Node("a", ok)]))
        await hooks.wait(5)
        await hooks.stop()
    assert len(rx.requests) == 3
    assert hooks.stats == {"sent": 0, "failed": 1, "dropped": 0, "attempts": 3}


async def test_only_the_chosen_events_are_sent():
    async with Receiver() as rx:
        hooks = notifier(rx.url, events="run.failed")
        runner = Runner(hooks=hooks)
        await runner.run(Workflow("ok", [Node("a", ok)]))
        await runner.run(Workflow("bad", [Node("a", boom)]))
        await hooks.wait(5)
        await hooks.stop()
    assert [json.loads(raw)["workflow"] for _, raw in rx.requests] == ["bad"]


async def test_a_hanging_receiver_never_blocks_the_run_and_stop_cancels_the_delivery():
    async with Receiver(hang=True) as rx:
        hooks = notifier(rx.url, timeout_s=60)
        t0 = time.monotonic()
        result = await Runner(hooks=hooks).run(Workflow("ok", [Node("a", ok)]))
        elapsed = time.monotonic() - t0
        assert result.status == "succeeded"
        await asyncio.wait_for(rx.arrived.wait(), 5)
        assert hooks.pending == 1, "the delivery is still waiting for the receiver"
        assert elapsed < 1.0
        t1 = time.monotonic()
        await hooks.stop(grace_s=0.1)
        assert time.monotonic() - t1 < 2.0
        assert hooks.pending == 0


async def test_a_receiver_slower_than_the_timeout_counts_as_a_failed_attempt():
    async with Receiver(hang=True) as rx:
        hooks = notifier(rx.url, timeout_s=0.2, retries=1)
        await Runner(hooks=hooks).run(Workflow("ok", [Node("a", ok)]))
        await hooks.wait(5)
        assert hooks.stats["failed"] == 1 and len(rx.requests) == 2
        await hooks.stop()


async def test_deliveries_beyond_max_pending_are_dropped_not_queued():
    async with Receiver(hang=True) as rx:
        hooks = WebhookNotifier(WebhookSettings(url=rx.url, timeout_s=60), max_pending=1)
        runner = Runner(hooks=hooks)
        await runner.run(Workflow("ok", [Node("a", ok)]))
        await runner.run(Workflow("ok", [Node("a", ok)]))
        assert hooks.pending == 1 and hooks.stats["dropped"] == 1
        await hooks.stop(grace_s=0)


async def test_an_unreachable_receiver_is_logged_not_raised():
    hooks = notifier("http://127.0.0.1:9/nothing-listens", retries=1)
    result = await Runner(hooks=hooks).run(Workflow("ok", [Node("a", ok)]))
    await hooks.wait(5)
    await hooks.stop()
    assert result.status == "succeeded"
    assert hooks.stats["failed"] == 1 and hooks.stats["attempts"] == 2


def test_a_running_run_has_no_webhook_body():
    from orchestrator.workflow.result import WorkflowRunResult
    assert build_body(WorkflowRunResult("r", "w", "n", status="running")) is None
