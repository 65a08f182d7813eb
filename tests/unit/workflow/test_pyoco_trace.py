"""pyoco's trace lines from the compatible surface: exact cute and plain texts, PYOCO_CUTE,
pyoco.run(), and a TraceBackend subclass receiving every event."""

from __future__ import annotations

import re

import pytest

import orchestrator.pyoco as pyoco
from orchestrator.pyoco import Engine, Flow, Task, task
from orchestrator.pyoco.trace.backend import TraceBackend
from orchestrator.pyoco.trace.console import ConsoleTraceBackend
from orchestrator.workflow.trace import Tracer

MS = r"\d+\.\d\d"


@pytest.fixture(autouse=True)
def _no_style_from_the_environment(monkeypatch):
    monkeypatch.delenv("PYOCO_CUTE", raising=False)
    monkeypatch.delenv("TOKIWA_CUTE", raising=False)
    Tracer.default_cute = None
    yield
    Tracer.default_cute = None


def two_task_flow(name):
    @task
    def fetch(ctx):
        return 1

    @task
    def save(ctx, fetch):
        return fetch

    return Flow(name) >> fetch >> save


def test_cute_lines_as_pyoco_prints_them(capsys):
    ctx = Engine().run(two_task_flow("hello"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"🐇 pyoco > start flow=hello run_id={ctx.run_context.run_id}"
    assert lines[1] == "🏃 start node=fetch"
    assert re.fullmatch(rf"✅ done node=fetch \({MS} ms\)", lines[2])
    assert lines[3] == "🏃 start node=save" and re.fullmatch(rf"✅ done node=save \({MS} ms\)", lines[4])
    assert lines[5:] == ["🥕 done flow=hello"]


@pytest.mark.parametrize("value", ["0", "false", "NO", "Off"])
def test_pyoco_cute_off_selects_plain_lines(monkeypatch, capsys, value):
    monkeypatch.setenv("PYOCO_CUTE", value)
    ctx = Engine().run(two_task_flow("plain"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"INFO pyoco start flow=plain run_id={ctx.run_context.run_id}"
    assert lines[1] == "INFO pyoco start node=fetch"
    assert re.fullmatch(rf"INFO pyoco end node=fetch dur_ms={MS}", lines[2])
    assert lines[-1] == "INFO pyoco end flow=plain"


def test_pyoco_cute_also_reaches_tokiwas_own_tracer(monkeypatch):
    monkeypatch.setenv("PYOCO_CUTE", "0")
    assert Tracer().cute is False
    monkeypatch.setenv("TOKIWA_CUTE", "1")
    assert Tracer().cute is True


def test_error_line_and_no_flow_end_when_the_run_raises(capsys):
    flow = Flow("bad")
    flow.add_task(Task(lambda: (_ for _ in ()).throw(ValueError("boom")), "explode"))
    with pytest.raises(ValueError):
        Engine(ConsoleTraceBackend("plain")).run(flow)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "ERROR pyoco error node=explode boom"


def test_pyoco_run_helper_prints_plain_lines_or_none(capsys):
    ctx = pyoco.run(two_task_flow("helper"), {"x": 1}, cute=False)
    out = capsys.readouterr().out
    assert ctx.results["save"] == 1 and out.startswith("INFO pyoco start flow=helper")
    pyoco.run(two_task_flow("quiet"), trace=False)
    assert capsys.readouterr().out == ""


def test_node_start_is_printed_once_however_many_retries(capsys):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 2:
            raise ValueError("again")

    flow = Flow("retry")
    flow.add_task(Task(flaky, "flaky", retries=1))
    Engine(ConsoleTraceBackend("cute")).run(flow)
    out = capsys.readouterr().out
    assert out.count("🏃 start node=flaky") == 1 and "💥" not in out


def test_a_trace_backend_subclass_gets_every_event():
    events = []

    class Recorder(TraceBackend):
        def on_flow_start(self, flow_name, run_id=None):
            events.append(("flow_start", flow_name, bool(run_id)))

        def on_flow_end(self, flow_name):
            events.append(("flow_end", flow_name))

        def on_node_start(self, node_name):
            events.append(("start", node_name))

        def on_node_end(self, node_name, duration_ms):
            events.append(("end", node_name, duration_ms >= 0))

        def on_node_error(self, node_name, error):
            events.append(("error", node_name, str(error)))

    flow = Flow("rec")
    flow >> Task(lambda: 1, "a") >> Task(lambda: 1 / 0, "b", fail_policy="isolate")
    Engine(Recorder()).run(flow)
    assert events == [("flow_start", "rec", True), ("start", "a"), ("end", "a", True), ("start", "b"),
                      ("error", "b", "division by zero"), ("flow_end", "rec")]


def test_console_backend_lines_and_transition(capsys):
    cute, plain = ConsoleTraceBackend("cute"), ConsoleTraceBackend("plain")
    cute.on_node_end("A", 100.0)
    cute.on_node_transition("A", "B")
    plain.on_node_transition("A", "B")
    plain.on_node_error("A", RuntimeError("x"))
    assert capsys.readouterr().out.splitlines() == ["✅ done node=A (100.00 ms)", "🐇 A -> B",
                                                    "ERROR pyoco error node=A x"]
    with pytest.raises(ValueError, match="cute"):
        ConsoleTraceBackend("loud")
