"""Sync nodes are interrupted when their node is cancelled or times out, and the run never
waits for their threads; tokiwa's Engine.run returns at once and raises no bogus context."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from pathlib import Path

import pytest

from orchestrator.workflow.execs import exec_shell
from orchestrator.workflow.flow import Engine, Flow, task
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.runner import Runner
from orchestrator.workflow.threads import NodeInterrupted, run_in_thread


class Spinner:
    """A sync handler looping on time.sleep(0.05) until it is stopped."""

    def __init__(self) -> None:
        self.ticks = 0
        self.running = threading.Event()
        self.stopped = threading.Event()
        self.caught: BaseException | None = None

    def __call__(self, ctx) -> None:
        try:
            while True:
                self.ticks += 1
                self.running.set()
                try:
                    time.sleep(0.05)
                except Exception:  # noqa: BLE001 - user code that swallows errors must still stop
                    pass
        except BaseException as exc:
            self.caught = exc
            raise
        finally:
            self.stopped.set()


def test_a_node_timeout_interrupts_a_sync_node_and_returns_at_once():
    spin = Spinner()
    started = time.monotonic()
    result = asyncio.run(Runner().run(Workflow("w", [Node("spin", spin, timeout=0.2)])))
    assert result.status == "failed" and result.nodes["spin"].error["name"] == "TimeoutError"
    assert time.monotonic() - started < 0.6
    assert spin.stopped.wait(1.0) and isinstance(spin.caught, NodeInterrupted)
    ticks = spin.ticks
    time.sleep(0.15)
    assert spin.ticks == ticks


async def test_cancelling_a_run_stops_its_sync_node_within_a_second():
    spin, runner = Spinner(), Runner()
    run = asyncio.ensure_future(runner.run(Workflow("c", [Node("spin", spin)]), run_id="r1"))
    assert await asyncio.to_thread(spin.running.wait, 5)
    cancelled_at = time.monotonic()
    assert runner.cancel("r1")
    result = await run
    assert result.status == "cancelled" and result.nodes["spin"].status == "cancelled"
    assert await asyncio.to_thread(spin.stopped.wait, 1.0)
    assert time.monotonic() - cancelled_at < 1.0


async def test_fail_fast_interrupts_a_sync_node_running_beside_the_failed_one():
    spin = Spinner()

    async def fail(ctx):
        await asyncio.to_thread(spin.running.wait, 5)
        raise ValueError("boom")

    result = await Runner().run(Workflow("ff", [Node("spin", spin), Node("fail", fail)]))
    assert result.status == "failed" and result.nodes["spin"].status == "cancelled"
    assert await asyncio.to_thread(spin.stopped.wait, 1.0)


async def test_a_node_blocked_in_c_code_is_abandoned_and_stops_when_it_returns_to_python():
    reached = threading.Event()
    done = threading.Event()

    def blocked(ctx):
        try:
            time.sleep(0.4)  # one C call: the interrupt lands when it returns
            reached.set()
        finally:
            done.set()

    started = time.monotonic()
    result = await Runner().run(Workflow("b", [Node("blocked", blocked, timeout=0.1)]))
    assert result.status == "failed" and time.monotonic() - started < 0.35
    assert await asyncio.to_thread(done.wait, 2.0)
    assert not reached.is_set()


async def test_run_in_thread_returns_values_raises_errors_and_carries_context_variables():
    var = contextvars.ContextVar("var", default="unset")
    var.set("caller")
    assert await run_in_thread(lambda: var.get()) == "caller"

    def fail():
        raise KeyError("k")

    with pytest.raises(KeyError, match="k"):
        await run_in_thread(fail)

    async def later():
        return 5

    assert await run_in_thread(later) == 5


def test_an_interrupted_sync_command_kills_its_child(tmp_path: Path):
    pid_file = tmp_path / "pid"

    def run_command(ctx):
        exec_shell(f"echo $$ > {pid_file}; exec sleep 30", allow_shell=True)

    started = time.monotonic()
    result = asyncio.run(Runner().run(Workflow("cmd", [Node("cmd", run_command, timeout=0.5)])))
    assert result.status == "failed"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"child {pid} still alive")
    assert time.monotonic() - started < 2.0


def test_engine_run_returns_when_a_sync_task_times_out_without_waiting_for_its_thread():
    @task(timeout_sec=0.1)
    def sleepy():
        time.sleep(1.5)

    started = time.monotonic()
    result = Engine(trace=False).run(Flow("t") >> sleepy)
    assert result.status == "failed" and time.monotonic() - started < 0.6


def test_engine_run_failures_carry_no_event_loop_context():
    @task
    async def broken():
        raise ValueError("x")

    result = Engine(trace=False).run(Flow("ctx") >> broken)
    error = result.nodes["broken"].exception
    assert isinstance(error, ValueError) and error.__context__ is None


def test_engine_cancel_from_another_thread_cancels_the_run():
    spin = Spinner()
    engine = Engine(trace=False)
    box = {}

    @task(name="spin")
    def spinning(ctx):
        spin(ctx)

    def runs():
        box["result"] = engine.run(Flow("cancel") >> spinning, run_id="r-engine")

    thread = threading.Thread(target=runs)
    thread.start()
    assert spin.running.wait(5)
    assert engine.cancel("r-engine") is True
    thread.join(5)
    assert box["result"].status == "cancelled" and spin.stopped.wait(1.0)
    assert engine.cancel("r-engine") is False


def test_pool_threads_are_reused_and_an_interrupted_thread_serves_later_calls_cleanly():
    def spin(ctx):
        while True:
            time.sleep(0.01)

    idents = set()

    def who(ctx):
        idents.add(threading.get_ident())
        time.sleep(0.002)
        return ctx.attempt

    async def main():
        runner = Runner()
        for _ in range(5):
            timed_out = await runner.run(Workflow("spin", [Node("spin", spin, timeout=0.05)]))
            assert timed_out.status == "failed"
        nodes = [Node("n0", who)] + [Node(f"n{i}", who, [f"n{i - 1}"]) for i in range(1, 40)]
        for _ in range(3):
            result = await runner.run(Workflow("chain", nodes))
            assert result.status == "succeeded", result.errors

    asyncio.run(main())
    assert len(idents) <= 3


async def test_node_context_is_cancelled_follows_the_run_signal():
    contexts = []

    async def watch(ctx):
        contexts.append(ctx)
        await asyncio.sleep(30)

    runner = Runner()
    run = asyncio.ensure_future(runner.run(Workflow("flag", [Node("watch", watch)]), run_id="flag"))
    while not contexts:
        await asyncio.sleep(0.005)
    assert contexts[0].is_cancelled is False
    runner.cancel("flag")
    result = await run
    assert result.status == "cancelled" and contexts[0].is_cancelled is True
