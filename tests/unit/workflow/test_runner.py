"""The Runner: scheduling, fail-fast, retries, timeouts, cancellation and hooks."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from orchestrator import errors
from orchestrator.workflow.hooks import WorkflowHooks
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.retry import RetryPolicy
from orchestrator.workflow.runner import Runner


class Recorder:
    """Handlers that log start/end order and track how many run at once."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.active = 0
        self.max_active = 0

    def node(self, name: str, deps=(), delay: float = 0.0, value=None) -> Node:
        async def handler(ctx):
            self.events.append(f"start:{name}")
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                await asyncio.sleep(delay)
            finally:
                self.active -= 1
            self.events.append(f"end:{name}")
            return name if value is None else value
        return Node(name, handler, list(deps))

    def position(self, event: str) -> int:
        return self.events.index(event)


class Services:
    """Injected sleep (records, never waits) and clock."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.now = 1000.0

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def clock(self) -> float:
        self.now += 1.0
        return self.now


def statuses(result) -> dict[str, str]:
    return {name: node.status for name, node in result.nodes.items()}


async def fail(ctx):
    raise ValueError(f"{ctx.node_name} broke")


# --------------------------------------------------------------------------- scheduling
async def test_diamond_runs_the_join_after_both_branches_with_their_outputs():
    rec = Recorder()

    async def join(ctx):
        return ctx.get_result("b") + ctx.get_result("c")

    flow = Workflow("diamond", [rec.node("a"), rec.node("b", ["a"], 0.01), rec.node("c", ["a"]),
                                Node("d", join, ["b", "c"])])
    result = await Runner().run(flow)
    assert result.status == "succeeded"
    assert result.output_of("d") == "bc"
    assert rec.position("end:a") < rec.position("start:b") and rec.position("end:a") < rec.position("start:c")
    assert result.results[flow.get_node("d").id] == "bc"


async def test_fan_out_runs_the_branches_in_parallel():
    rec = Recorder()
    flow = Workflow("fan-out", [rec.node("root")] + [rec.node(f"leaf{i}", ["root"], 0.02) for i in range(4)])
    result = await Runner().run(flow, concurrency=4)
    assert result.status == "succeeded"
    assert rec.max_active == 4


async def test_fan_in_waits_for_every_dependency():
    rec = Recorder()
    sources = [rec.node(f"src{i}", delay=0.005 * i) for i in range(3)]
    flow = Workflow("fan-in", sources + [rec.node("sink", [s.name for s in sources])])
    await Runner().run(flow)
    assert rec.position("start:sink") > max(rec.position(f"end:src{i}") for i in range(3))


async def test_independent_chains_interleave_but_keep_their_own_order():
    rec = Recorder()
    nodes = []
    for chain in "xy":
        for step in range(3):
            deps = [f"{chain}{step - 1}"] if step else []
            nodes.append(rec.node(f"{chain}{step}", deps, 0.005))
    await Runner().run(Workflow("chains", nodes))
    for chain in "xy":
        ends = [rec.position(f"end:{chain}{s}") for s in range(3)]
        assert ends == sorted(ends)
    assert rec.position("start:y0") < rec.position("end:x0")  # the chains ran side by side


async def test_observed_parallelism_never_exceeds_and_reaches_the_concurrency_limit():
    rec = Recorder()
    flow = Workflow("wide", [rec.node(f"n{i}", delay=0.01) for i in range(10)])
    result = await Runner().run(flow, concurrency=3)
    assert result.status == "succeeded"
    assert rec.max_active == 3


async def test_default_concurrency_is_four_for_workflows_and_one_for_chatflows():
    rec = Recorder()
    await Runner().run(Workflow("w", [rec.node(f"n{i}", delay=0.01) for i in range(8)]))
    assert rec.max_active == 4
    chat = Recorder()
    flow = Workflow("c", [chat.node(f"n{i}", delay=0.005) for i in range(3)], type="chatflow")
    await Runner().run(flow, conversation_id="conv-1")
    assert chat.max_active == 1


async def test_a_node_starts_as_soon_as_its_own_dependency_finishes_not_its_whole_level():
    release = asyncio.Event()

    async def slow(ctx):
        await release.wait()  # finishes only after "after_fast" ran
        return "slow"

    async def after_fast(ctx):
        release.set()
        return "after"

    flow = Workflow("eager", [Node("fast", lambda ctx: "fast"), Node("slow", slow),
                              Node("after_fast", after_fast, ["fast"])])
    result = await Runner().run(flow, timeout=5)  # a level-by-level runner would time out here
    assert result.status == "succeeded"
    order = [(e["type"], e.get("node")) for e in result.timeline]
    assert order.index(("node_start", "after_fast")) < order.index(("node_complete", "slow"))


async def test_sync_handlers_run_in_worker_threads_and_async_ones_on_the_loop():
    seen = {}

    def sync_handler(ctx):
        seen["sync"] = threading.get_ident()

    async def async_handler(ctx):
        seen["async"] = threading.get_ident()

    await Runner().run(Workflow("threads", [Node("s", sync_handler), Node("a", async_handler)]))
    assert seen["async"] == threading.get_ident()
    assert seen["sync"] != threading.get_ident()


# --------------------------------------------------------------------------- failures
async def test_fail_fast_cancels_a_sleeping_async_node_within_100_ms_and_skips_dependents():
    started = asyncio.Event()

    async def sleeper(ctx):
        started.set()
        await asyncio.sleep(10)

    async def failer(ctx):
        await started.wait()
        raise ValueError("boom")

    flow = Workflow("ff", [Node("sleeper", sleeper), Node("failer", failer),
                           Node("after", lambda ctx: None, ["sleeper"])])
    t0 = time.perf_counter()
    result = await Runner().run(flow)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.1
    assert result.status == "failed"
    assert statuses(result) == {"sleeper": "cancelled", "failer": "failed", "after": "skipped"}
    assert result.nodes["sleeper"].error["name"] == "WorkflowAborted"
    assert result.error["message"] == "boom"
    assert result.errors == {flow.get_node("failer").id: {"name": "ValueError", "message": "boom"}}


async def test_fail_fast_sets_the_signal_that_a_sync_node_can_watch():
    saw_signal = threading.Event()
    sync_started = threading.Event()

    def watcher(ctx):
        sync_started.set()
        if ctx.signal.wait(5):
            saw_signal.set()

    async def failer(ctx):
        await asyncio.to_thread(sync_started.wait, 5)
        raise ValueError("boom")

    result = await Runner().run(Workflow("sync-ff", [Node("watcher", watcher), Node("failer", failer)]))
    assert result.nodes["watcher"].status == "cancelled"
    assert await asyncio.to_thread(saw_signal.wait, 5)


async def test_fail_fast_marks_never_started_nodes_skipped_in_the_timeline():
    flow = Workflow("ff", [Node("a", fail), Node("b", lambda ctx: 1, ["a"]), Node("c", lambda ctx: 1, ["b"])])
    result = await Runner().run(flow, concurrency=1)
    assert statuses(result) == {"a": "failed", "b": "skipped", "c": "skipped"}
    skipped = [e["node"] for e in result.timeline if e["type"] == "node_skipped"]
    assert sorted(skipped) == ["b", "c"]


async def test_without_fail_fast_the_independent_branch_still_runs():
    rec = Recorder()
    flow = Workflow("branches", [Node("bad", fail), Node("child", lambda ctx: 1, ["bad"]),
                                 Node("grandchild", lambda ctx: 1, ["child"]),
                                 rec.node("other", delay=0.02), rec.node("other2", ["other"])])
    result = await Runner().run(flow, fail_fast=False)
    assert result.status == "failed"
    assert statuses(result) == {"bad": "failed", "child": "skipped", "grandchild": "skipped",
                                "other": "succeeded", "other2": "succeeded"}
    reasons = {e["node"]: e["reason"] for e in result.timeline if e["type"] == "node_skipped"}
    assert reasons["child"] == "dependency 'bad' failed"


async def test_a_failing_node_does_not_make_run_raise():
    result = await Runner().run(Workflow("one", [Node("a", fail)]))
    assert result.status == "failed"
    assert isinstance(result.nodes["a"].exception, ValueError)


# --------------------------------------------------------------------------- retries
async def test_retries_use_the_policy_delays_through_the_injected_sleep():
    calls = []

    async def flaky(ctx):
        calls.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("try again")
        return "ok"

    services = Services()
    policy = RetryPolicy(max_attempts=4, backoff="exponential", initial_delay_s=1.5, multiplier=2)
    result = await Runner(services=services).run(Workflow("retry", [Node("flaky", flaky, retry=policy)]))
    assert result.status == "succeeded" and calls == [1, 2, 3]
    assert services.sleeps == [1.5, 3.0]
    node_id = result.nodes["flaky"].node_id
    assert result.attempts == {node_id: 3} and result.nodes["flaky"].attempts == 3
    retries = [e for e in result.timeline if e["type"] == "node_retry"]
    assert [(e["attempt"], e["next_delay_s"]) for e in retries] == [(1, 1.5), (2, 3.0)]


@pytest.mark.parametrize("backoff, expected", [("fixed", [2.0, 2.0, 2.0]), ("linear", [2.0, 3.0, 4.0]),
                                                ("exponential", [2.0, 4.0, 8.0])])
async def test_each_backoff_kind_produces_its_delays(backoff, expected):
    services = Services()
    policy = RetryPolicy(max_attempts=4, backoff=backoff, initial_delay_s=2, increment_s=1)
    result = await Runner(services=services).run(Workflow("b", [Node("x", fail, retry=policy)]))
    assert services.sleeps == expected
    assert result.nodes["x"].attempts == 4


async def test_jitter_uses_the_injected_random_source():
    class Rng:
        def uniform(self, a, b):
            return b / 2

    services = Services()
    services.rng = Rng()
    policy = RetryPolicy(max_attempts=2, initial_delay_s=4, jitter="full")
    await Runner(services=services).run(Workflow("j", [Node("x", fail, retry=policy)]))
    assert services.sleeps == [2.0]


async def test_exhausted_retries_record_retry_exhausted_with_the_last_error_as_cause():
    policy = RetryPolicy(max_attempts=3, initial_delay_s=0)
    result = await Runner().run(Workflow("r", [Node("x", fail, retry=policy)]))
    error = result.nodes["x"].error
    assert error["name"] == "RetryExhausted"
    assert "failed after 3 attempts" in error["message"]
    assert error["cause"] == {"name": "ValueError", "message": "x broke"}
    assert result.nodes["x"].exception.__cause__.args == ("x broke",)


async def test_a_non_retryable_error_fails_at_once():
    services = Services()
    policy = RetryPolicy(max_attempts=5, retry_on=(ConnectionError,))
    result = await Runner(services=services).run(Workflow("n", [Node("x", fail, retry=policy)]))
    assert result.nodes["x"].attempts == 1 and services.sleeps == []
    assert result.nodes["x"].error["name"] == "ValueError"


async def test_an_abort_cuts_a_retry_pause_short():
    async def failer(ctx):
        await asyncio.sleep(0.02)
        raise ValueError("boom")

    policy = RetryPolicy(max_attempts=2, initial_delay_s=30)
    flow = Workflow("pause", [Node("retrying", fail, retry=policy), Node("failer", failer)])
    t0 = time.perf_counter()
    result = await Runner().run(flow)
    assert time.perf_counter() - t0 < 1.0
    assert result.nodes["retrying"].status == "cancelled"


# --------------------------------------------------------------------------- timeouts
async def test_a_node_timeout_fails_the_node_with_a_timeout_error_naming_it():
    async def slow(ctx):
        await asyncio.sleep(10)

    result = await Runner().run(Workflow("t", [Node("slow", slow, timeout=0.05)]))
    error = result.nodes["slow"].exception
    assert isinstance(error, errors.TimeoutError) and error.node == "slow" and error.timeout_s == 0.05
    assert "node 'slow' exceeded its timeout of 0.05s" in str(error)


async def test_a_node_timeout_applies_per_attempt_and_is_retried():
    async def slow_then_fast(ctx):
        if ctx.attempt == 1:
            await asyncio.sleep(10)
        return "fast"

    services = Services()
    node = Node("x", slow_then_fast, timeout=0.05, retry=RetryPolicy(max_attempts=2))
    result = await Runner(services=services).run(Workflow("t", [node]))
    assert result.status == "succeeded" and result.nodes["x"].attempts == 2


async def test_a_handler_raising_the_builtin_timeout_error_is_not_mistaken_for_a_node_timeout():
    async def raises(ctx):
        raise TimeoutError("upstream")

    result = await Runner().run(Workflow("t", [Node("x", raises, timeout=5)]))
    assert result.nodes["x"].error == {"name": "TimeoutError", "message": "upstream"}
    assert not isinstance(result.nodes["x"].exception, errors.TimeoutError)


async def test_a_workflow_timeout_raises_with_the_partial_result_attached():
    async def slow(ctx):
        await asyncio.sleep(10)

    flow = Workflow("t", [Node("quick", lambda ctx: "q"), Node("slow", slow, ["quick"]),
                          Node("later", lambda ctx: 1, ["slow"])])
    t0 = time.perf_counter()
    with pytest.raises(errors.TimeoutError, match="workflow 't' exceeded its timeout of 0.1s") as err:
        await Runner().run(flow, timeout=0.1)
    assert time.perf_counter() - t0 < 1.0
    assert err.value.node is None
    partial = err.value.result
    assert statuses(partial) == {"quick": "succeeded", "slow": "cancelled", "later": "skipped"}
    assert partial.status == "timed_out" and partial.failed and partial.error["name"] == "TimeoutError"


# --------------------------------------------------------------------------- cancellation
async def test_cancel_by_run_id_stops_the_run_with_status_cancelled():
    started = asyncio.Event()

    async def slow(ctx):
        started.set()
        await asyncio.sleep(10)

    runner = Runner()
    flow = Workflow("c", [Node("slow", slow), Node("next", lambda ctx: 1, ["slow"])])
    task = asyncio.create_task(runner.run(flow, run_id="run-1"))
    await started.wait()
    assert runner.active_runs == ["run-1"]
    assert runner.cancel("run-1") is True
    result = await asyncio.wait_for(task, 1)
    assert result.status == "cancelled"
    assert statuses(result) == {"slow": "cancelled", "next": "cancelled"}
    assert runner.cancel("run-1") is False


async def test_cancelling_the_caller_cancels_running_nodes_and_reraises():
    cancelled = asyncio.Event()

    async def slow(ctx):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runner = Runner()
    task = asyncio.create_task(runner.run(Workflow("c", [Node("slow", slow)])))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set() and runner.active_runs == []


async def test_a_node_that_ignores_cancellation_is_abandoned_after_the_grace_period(caplog):
    release = asyncio.Event()

    async def stubborn(ctx):
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue
        return "late"

    async def failer(ctx):
        await asyncio.sleep(0.01)
        raise ValueError("boom")

    runner = Runner(cancel_grace_s=0.05)
    result = await runner.run(Workflow("s", [Node("stubborn", stubborn), Node("failer", failer)]))
    assert result.nodes["stubborn"].status == "cancelled"
    assert "ignored cancellation" in caplog.text
    release.set()
    await asyncio.sleep(0.01)
    assert result.nodes["stubborn"].status == "cancelled"  # a late finish does not rewrite history


# --------------------------------------------------------------------------- hooks
async def test_hooks_see_start_retry_error_complete_and_run_end():
    seen = []

    class Hooks:
        def on_run_start(self, workflow, run_id):
            seen.append(("run_start", workflow.name))

        async def on_node_start(self, node, ctx):
            seen.append(("start", node.name, ctx.attempt))

        def on_node_retry(self, node, ctx, error, attempt, delay_s):
            seen.append(("retry", node.name, attempt, delay_s))

        def on_node_error(self, node, ctx, error):
            seen.append(("error", node.name, type(error).__name__))

        def on_node_complete(self, node, ctx, output):
            seen.append(("complete", node.name, output))

        async def on_run_complete(self, result):
            seen.append(("run_complete", result.status))

    flow = Workflow("h", [Node("ok", lambda ctx: 7),
                          Node("bad", fail, ["ok"], retry=RetryPolicy(max_attempts=2, initial_delay_s=0.5))])
    await Runner(services=Services()).run(flow, hooks=Hooks())
    assert seen == [("run_start", "h"), ("start", "ok", 1), ("complete", "ok", 7), ("start", "bad", 1),
                    ("retry", "bad", 1, 0.5), ("start", "bad", 2), ("error", "bad", "RetryExhausted"),
                    ("run_complete", "failed")]


async def test_a_failing_hook_is_logged_and_not_fatal(caplog):
    class Broken:
        def on_node_start(self, node, ctx):
            raise RuntimeError("hook bug")

    with caplog.at_level(logging.WARNING, logger="tokiwa.runner"):
        result = await Runner(hooks=Broken()).run(Workflow("h", [Node("a", lambda ctx: 1)]))
    assert result.status == "succeeded"
    assert "on_node_start" in caplog.text and "hook bug" in caplog.text


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs, match", [
    ({"concurrency": 0}, "concurrency must be an integer >= 1"),
    ({"concurrency": 2.5}, "concurrency"),
    ({"timeout": -1}, "timeout must be a positive"),
    ({"memory": ["x"]}, "memory must be a dict"),
])
async def test_bad_run_arguments_are_rejected(kwargs, match):
    with pytest.raises(errors.InvalidArgumentError, match=match):
        await Runner().run(Workflow("w", [Node("a", lambda ctx: 1)]), **kwargs)


async def test_a_chatflow_needs_a_conversation_id():
    flow = Workflow("chat", [Node("a", lambda ctx: 1)], type="chatflow")
    for conversation_id in (None, "  "):
        with pytest.raises(errors.InvalidArgumentError, match="conversation id"):
            await Runner().run(flow, conversation_id=conversation_id)


async def test_run_rejects_something_that_is_not_a_workflow():
    with pytest.raises(errors.InvalidArgumentError, match="expects a Workflow"):
        await Runner().run("order-flow")


async def test_an_invalid_graph_is_rejected_before_anything_runs():
    flow = Workflow("bad")
    flow.add_node(Node("a", lambda ctx: 1, ["ghost"]))
    with pytest.raises(errors.DependencyError, match="ghost"):
        await Runner().run(flow)


async def test_workflow_hooks_subclasses_need_only_override_what_they_use():
    completed = []

    class OnlyComplete(WorkflowHooks):
        async def on_node_complete(self, node, ctx, output):
            completed.append((node.name, output))

    result = await Runner().run(Workflow("h", [Node("a", lambda ctx: 1)]), hooks=[OnlyComplete()])
    assert result.status == "succeeded" and completed == [("a", 1)]


async def test_a_shared_executor_runs_sync_handlers_when_given():
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokiwa-test") as pool:
        result = await Runner(executor=pool).run(
            Workflow("x", [Node("a", lambda ctx: threading.current_thread().name)]))
    assert result.output_of("a").startswith("tokiwa-test")


async def test_an_inline_sync_handler_runs_on_the_loop_thread():
    result = await Runner().run(Workflow("i", [Node("a", lambda ctx: threading.get_ident(), inline=True)]))
    assert result.output_of("a") == threading.get_ident()


async def test_an_empty_workflow_succeeds_at_once():
    result = await Runner().run(Workflow("empty"))
    assert result.status == "succeeded" and result.nodes == {}
    assert [e["type"] for e in result.timeline] == ["run_start", "run_complete"]


async def test_a_run_id_cannot_be_used_twice_at_the_same_time():
    release = asyncio.Event()

    async def wait(ctx):
        await release.wait()

    runner = Runner()
    first = asyncio.create_task(runner.run(Workflow("w", [Node("a", wait)]), run_id="same"))
    await asyncio.sleep(0)
    with pytest.raises(errors.ConflictError, match="'same' is already running"):
        await runner.run(Workflow("w2", [Node("a", wait)]), run_id="same")
    release.set()
    assert (await first).status == "succeeded"
