"""The pyoco-compatible Engine on tokiwa's Runner: results by name, pyoco's failure rules,
timeouts, OR-joins, outputs, cancellation and interrupted sync tasks."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from orchestrator.pyoco import Engine, Flow, RunStatus, Task, TaskState, task
from orchestrator.pyoco.core.exceptions import FlowGraphError
from orchestrator.pyoco.core.models import RunContext
from orchestrator.pyoco.dsl.syntax import Branch
from orchestrator.pyoco.trace.console import SilentTraceBackend


def engine() -> Engine:
    return Engine(SilentTraceBackend())


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_results_are_keyed_by_task_name_and_inputs_are_wired():
    @task
    def load(ctx):
        return {"n": 2}

    @task
    def add(ctx, n, extra):
        return n + extra

    add.task.inputs = {"n": "$node.load.output.n"}
    ctx = engine().run(Flow("wire") >> load >> add, params={"extra": 40})
    assert ctx.results == {"load": {"n": 2}, "add": 42}
    assert ctx.run_context.status == RunStatus.COMPLETED
    assert ctx.run_context.tasks == {"load": TaskState.SUCCEEDED, "add": TaskState.SUCCEEDED}
    assert ctx.run_context.task_records["add"].inputs == {"n": 2, "extra": 40}
    assert ctx.run_context.end_time >= ctx.run_context.start_time


def test_parameters_are_auto_wired_from_params_then_results():
    a = Task(lambda: 10, "a")
    b = Task(lambda a, base: a + base, "b")
    flow = Flow()
    flow >> a >> b
    assert engine().run(flow, {"base": 1}).results["b"] == 11


def test_a_failing_stop_task_raises_its_own_exception_without_a_bogus_context():
    def explode():
        raise ValueError("kaboom")

    flow = Flow()
    flow.add_task(Task(explode, "a"))
    with pytest.raises(ValueError, match="kaboom") as info:
        engine().run(flow)
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_a_failed_run_records_failed_states():
    run = RunContext()
    after = Task(lambda: 1, "after")
    bad = Task(lambda: 1 / 0, "bad")
    Flow() >> bad >> after
    flow = Flow()
    flow.add_task(bad)
    flow.add_task(after)
    with pytest.raises(ZeroDivisionError):
        engine().run(flow, run_context=run)
    assert run.status == RunStatus.FAILED and run.tasks["bad"] == TaskState.FAILED
    assert run.tasks["after"] == TaskState.CANCELLED and "ZeroDivisionError" in run.task_records["bad"].traceback


def test_retries_rerun_the_task_and_exhausted_retries_raise_the_last_error():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("transient")
        return "ok"

    flow = Flow()
    flow.add_task(Task(flaky, "a", retries=3))
    assert engine().run(flow).results["a"] == "ok" and len(calls) == 3

    def always():
        calls.append(1)
        raise ValueError(f"permanent {len(calls)}")

    calls.clear()
    flow = Flow()
    flow.add_task(Task(always, "a", retries=2))
    with pytest.raises(ValueError, match="permanent 3"):
        engine().run(flow)


def test_a_timeout_raises_the_builtin_timeout_error_without_waiting_for_the_thread():
    flow = Flow()
    flow.add_task(Task(lambda: time.sleep(1.0), "sleepy", timeout_sec=0.1))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"Task 'sleepy' exceeded timeout of 0.1s") as info:
        engine().run(flow)
    assert type(info.value) is TimeoutError
    assert time.monotonic() - started < 0.6


def test_isolate_fails_the_task_and_its_dependents_and_the_run_completes():
    ran = []
    bad = Task(lambda: 1 / 0, "bad", fail_policy="isolate")
    child = Task(lambda: ran.append("child"), "child")
    grandchild = Task(lambda: ran.append("grandchild"), "grandchild")
    other = Task(lambda: ran.append("other") or "ok", "other")
    flow = Flow()
    flow >> bad >> child >> grandchild
    flow.add_task(other)
    ctx = engine().run(flow)
    assert ran == ["other"] and ctx.results == {"other": "ok"}
    assert ctx.run_context.status == RunStatus.COMPLETED
    assert {n: s.value for n, s in ctx.run_context.tasks.items()} == {
        "bad": "FAILED", "child": "FAILED", "grandchild": "FAILED", "other": "SUCCEEDED"}


def test_an_or_join_runs_once_one_dependency_succeeded():
    def slow():
        time.sleep(0.3)
        return "slow"

    fast = Task(lambda: "fast", "fast")
    failing = Task(lambda: 1 / 0, "failing", fail_policy="isolate")
    late = Task(slow, "late")
    join = Task(lambda: "joined", "join", trigger_policy="ANY")
    for dep in (fast, failing, late):
        join.dependencies.add(dep)
    flow = Flow()
    for t in (fast, failing, late, join):
        flow.add_task(t)
    seen = {}
    join.func = lambda ctx: seen.setdefault("late_done", "late" in ctx.results) or "joined"
    ctx = engine().run(flow)
    assert ctx.results["join"] == "joined" and seen == {"late_done": False}
    assert ctx.run_context.tasks["join"] == TaskState.SUCCEEDED


def test_an_or_join_whose_dependencies_all_failed_fails_without_running():
    a = Task(lambda: 1 / 0, "a", fail_policy="isolate")
    b = Task(lambda: 1 / 0, "b", fail_policy="isolate")
    join = Task(lambda: "never", "join", trigger_policy="ANY")
    after = Task(lambda: "never", "after")
    Branch([a, b]) >> join
    flow = Flow()
    for t in (a, b, join, after):
        flow.add_task(t)
    after.dependencies.add(join)
    ctx = engine().run(flow)
    assert "join" not in ctx.results and ctx.run_context.tasks["join"] == TaskState.FAILED
    assert ctx.run_context.tasks["after"] == TaskState.FAILED and ctx.run_context.status == RunStatus.COMPLETED


def test_outputs_store_the_result_at_context_paths():
    flow = Flow()
    flow.add_task(Task(lambda: {"acc": 0.9}, "train", outputs=["scratch.metrics.last", "results.alias", "nowhere.x"]))
    ctx = engine().run(flow)
    assert ctx.scratch == {"metrics": {"last": {"acc": 0.9}}} and ctx.results["alias"] == {"acc": 0.9}


def test_independent_tasks_run_in_parallel():
    flow = Flow()
    for name in "abcd":
        flow.add_task(Task(lambda: time.sleep(0.2), name))
    started = time.monotonic()
    engine().run(flow)
    assert time.monotonic() - started < 0.6


def test_async_task_functions_are_awaited():
    async def fetch(ctx):
        await asyncio.sleep(0)
        return ctx.params["v"] * 2

    flow = Flow()
    flow.add_task(Task(fetch, "fetch"))
    assert engine().run(flow, {"v": 21}).results["fetch"] == 42


def test_a_task_output_is_captured_into_the_run_logs(capsys):
    flow = Flow()
    flow.add_task(Task(lambda: print("hello from a task"), "talk"))
    ctx = engine().run(flow)
    assert [(e["task"], e["stream"], e["text"]) for e in ctx.run_context.logs] == [("talk", "stdout", "hello from a task\n")]
    assert "hello from a task" in capsys.readouterr().out


def test_a_cycle_or_a_dependency_outside_the_flow_is_an_error_before_anything_runs():
    ran = []
    a, b = Task(lambda: ran.append("a"), "a"), Task(lambda: ran.append("b"), "b")
    a.dependencies.add(b)
    b.dependencies.add(a)
    flow = Flow("loop")
    flow.add_task(a)
    flow.add_task(b)
    with pytest.raises(FlowGraphError, match="cycle") as info:
        engine().run(flow)
    assert isinstance(info.value, RuntimeError)
    lonely = Task(lambda: None, "lonely")
    lonely.dependencies.add(Task(lambda: None, "elsewhere"))
    flow = Flow("missing")
    flow.add_task(lonely)
    with pytest.raises(FlowGraphError, match="'elsewhere', which is not in the flow"):
        engine().run(flow)
    assert ran == []


def test_cancel_from_another_thread_stops_a_sync_task_within_a_second_and_cancels_the_rest():
    ticks, stopped = [], threading.Event()

    def spin(ctx):
        try:
            while True:
                ticks.append(ctx.is_cancelled)
                time.sleep(0.05)
        finally:
            stopped.set()

    eng, box = engine(), {}
    flow = Flow("cancel") >> Task(spin, "spin") >> Task(lambda: "never", "after")
    runner = threading.Thread(target=lambda: box.setdefault("ctx", eng.run(flow)))
    runner.start()
    wait_until(lambda: len(ticks) >= 2)
    run_id = next(iter(eng.active_runs))
    run = eng.get_run(run_id)
    cancelled_at = time.monotonic()
    eng.cancel(run_id)
    # CANCELLING at once (or already CANCELLED when the run stopped before this line)
    assert run.status in (RunStatus.CANCELLING, RunStatus.CANCELLED)
    runner.join(5)
    assert stopped.wait(1.0) and time.monotonic() - cancelled_at < 1.0
    count = len(ticks)
    time.sleep(0.2)
    assert len(ticks) == count
    run = box["ctx"].run_context
    assert run.status == RunStatus.CANCELLED and "after" not in box["ctx"].results
    assert run.tasks == {"spin": TaskState.CANCELLED, "after": TaskState.CANCELLED}
    assert eng.active_runs == {}


def test_run_works_inside_a_running_event_loop():
    flow = Flow()
    flow.add_task(Task(lambda: "ok", "a"))

    async def main():
        return engine().run(flow).results

    assert asyncio.run(main()) == {"a": "ok"}


async def test_run_async_runs_on_the_callers_loop():
    flow = Flow()
    flow.add_task(Task(lambda: "ok", "a"))
    ctx = await engine().run_async(flow)
    assert ctx.results == {"a": "ok"} and ctx.run_context.status == RunStatus.COMPLETED


@pytest.mark.parametrize("attribute, value", [("fail_policy", "maybe"), ("retries", -1), ("timeout_sec", 0),
                                              ("trigger_policy", "SOME")])
def test_bad_task_attributes_are_clear_errors(attribute, value):
    t = Task(lambda: None, "a")
    setattr(t, attribute, value)
    flow = Flow()
    flow.add_task(t)
    with pytest.raises(ValueError, match=attribute):
        engine().run(flow)
