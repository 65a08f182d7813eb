"""The pyoco-compatible model: Task identity and edges, Flow building with >>, states, RunContext."""

from __future__ import annotations

import uuid

import pytest

from orchestrator import errors
from orchestrator.pyoco import Flow, RunStatus, Task, TaskState, task
from orchestrator.pyoco.core.models import RunContext
from orchestrator.pyoco.dsl.syntax import Branch, Parallel, TaskWrapper


def noop():
    return None


def test_task_takes_func_then_name_positionally_and_is_identified_by_its_name():
    first, again = Task(noop, "a"), Task(lambda: 1, "a")
    assert first.func is noop and first.name == "a"
    assert first == again and hash(first) == hash(again) and first != Task(noop, "b")
    assert (first.fail_policy, first.retries, first.timeout_sec, first.trigger_policy) == ("stop", 0, None, "ALL")


def test_flow_tasks_is_a_set_and_add_task_adds_without_edges():
    flow = Flow("f")
    a, b = Task(noop, "a"), Task(noop, "b")
    flow.add_task(a)
    flow.add_task(b)
    flow.add_task(Task(noop, "a"))
    assert isinstance(flow.tasks, set) and flow.tasks == {a, b}
    assert not a.dependencies and not b.dependencies


def test_flow_chain_puts_dependency_edges_on_the_task_objects():
    @task
    def one():
        return 1

    @task
    def two():
        return 2

    flow = Flow("chain")
    assert (flow >> one >> two) is flow
    assert one.task in two.task.dependencies and two.task in one.task.dependents
    assert [t.name for t in flow.ordered_tasks()] == ["one", "two"]


def test_chaining_plain_task_objects_links_them_too():
    a, b = Task(noop, "a"), Task(noop, "b")
    Flow("plain") >> a >> b
    assert b.dependencies == {a}


def test_flow_then_a_parallel_group_then_a_task_is_an_and_join():
    @task
    def start():
        pass

    @task
    def left():
        pass

    @task
    def right():
        pass

    @task
    def join():
        pass

    flow = Flow("diamond")
    flow >> start >> (left & right) >> join
    assert isinstance(left & right, Parallel)
    assert left.task.dependencies == {start.task} == right.task.dependencies
    assert join.task.dependencies == {left.task, right.task} and join.task.trigger_policy == "ALL"


def test_a_branch_into_a_task_makes_it_an_or_join():
    @task
    def a():
        pass

    @task
    def b():
        pass

    @task
    def c():
        pass

    branch = a | b
    assert isinstance(branch, Branch) and len(branch) == 2
    branch >> c
    assert c.task.trigger_policy == "ANY" and c.task.dependencies == {a.task, b.task}


def test_task_decorator_returns_a_wrapper_whose_call_returns_itself_and_takes_options():
    @task(name="renamed", retries=2, timeout_sec=1.5, fail_policy="isolate", outputs=["scratch.x"])
    def original(ctx):
        return 1

    assert isinstance(original, TaskWrapper) and original() is original
    t = original.task
    assert (t.name, t.retries, t.timeout_sec, t.fail_policy, t.outputs) == ("renamed", 2, 1.5, "isolate", ["scratch.x"])


def test_bad_task_options_and_flow_items_are_clear_errors():
    with pytest.raises(errors.InvalidArgumentError, match="fail_policy"):
        task(fail_policy="sometimes")
    with pytest.raises(errors.InvalidArgumentError, match="trigger_policy"):
        task(trigger_policy="SOME")
    with pytest.raises(errors.InvalidArgumentError, match="expected a task"):
        Flow("f") >> 42


def test_state_enums_carry_pyoco_values():
    assert [s.value for s in TaskState] == ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
    assert [s.value for s in RunStatus] == ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLING", "CANCELLED"]


def test_run_context_starts_running_with_a_uuid4_and_serializes_odd_values_as_repr():
    run = RunContext(flow_name="f")
    assert uuid.UUID(run.run_id).version == 4 and run.status == RunStatus.RUNNING and run.end_time is None
    record = run.ensure_task_record("a")
    record.inputs, record.output = {"x": object(), "n": 1}, {"ok": [1, 2]}
    data = run.serialize_task_records()["a"]
    assert data["state"] == "PENDING" and data["inputs"]["n"] == 1 and data["inputs"]["x"].startswith("<object")
    assert data["output"] == {"ok": [1, 2]}


def test_run_context_logs_are_numbered_and_drained_once():
    run = RunContext()
    run.append_log("a", "stdout", "hello\n")
    run.append_log("a", "stderr", "")
    run.append_log("b", "stderr", "oops\n")
    assert [(e["seq"], e["task"], e["stream"]) for e in run.logs] == [(0, "a", "stdout"), (1, "b", "stderr")]
    assert len(run.drain_logs()) == 2 and run.drain_logs() == []
