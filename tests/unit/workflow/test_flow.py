"""pyoco's API on the tokiwa engine: @task, Flow, >> chains, input wiring, Engine and trace lines."""

from __future__ import annotations

import asyncio
import io
import re

import pytest

from orchestrator import errors
from orchestrator.workflow.context import NodeContext
from orchestrator.workflow.flow import Engine, Flow, task
from orchestrator.workflow.model import Workflow
from orchestrator.workflow.runner import Runner
from orchestrator.workflow.trace import Tracer


@task
def load():
    return {"n": 2, "items": [10, 20]}


@task
def add(x, y=1):
    return x + y


@task(name="double", retries=2, timeout_sec=3)
def twice(value):
    return value * 2


def deps(flow: Flow) -> dict[str, list[str]]:
    return flow.dependencies


def run(flow, params=None, **kwargs):
    return Engine(trace=False).run(flow, params, **kwargs)


@pytest.fixture(autouse=True)
def _cute_from_environment(monkeypatch):
    monkeypatch.delenv("TOKIWA_CUTE", raising=False)
    Tracer.default_cute = None
    yield
    Tracer.default_cute = None


# --------------------------------------------------------------------------- tasks
def test_bare_task_decorator_wraps_the_function_under_its_name():
    assert add.name == "add" and add.task.func(x=1) == 2
    assert add.task.retries == 0 and add.task.timeout_sec is None


def test_task_decorator_with_arguments_sets_name_retries_and_timeout():
    assert twice.name == "double"
    node = (Flow("f") >> twice(value=1)).to_workflow().get_node("double")
    assert node.timeout == 3.0
    assert node.retry.max_attempts == 3 and node.retry.backoff == "fixed" and node.retry.initial_delay_s == 0.1


def test_calling_a_task_with_inputs_returns_a_configured_copy():
    configured = add(x="$node.load.output.n")
    assert configured.task.inputs == {"x": "$node.load.output.n"} and configured.name == "add"
    assert add.task.inputs == {}


def test_inputs_for_unknown_parameters_or_positional_calls_are_rejected():
    with pytest.raises(errors.InvalidArgumentError, match="task 'add' has no parameter 'z'"):
        add(z=1)
    with pytest.raises(errors.InvalidArgumentError, match="pass inputs as keywords"):
        add(1)
    with pytest.raises(errors.InvalidArgumentError, match="retries must be an integer >= 0"):
        task(retries=-1)(lambda: None)


# --------------------------------------------------------------------------- graphs
def test_rshift_chain_makes_each_task_depend_on_the_previous_one():
    flow = Flow(name="main")
    assert (flow >> load >> add >> twice) is flow
    assert deps(flow) == {"load": [], "add": ["load"], "double": ["add"]}


def test_lists_fan_out_and_fan_in():
    b, c = add.configure(name="b"), add.configure(name="c")
    flow = Flow("fan")
    flow >> load >> [b, c] >> twice
    assert deps(flow) == {"load": [], "b": ["load"], "c": ["load"], "double": ["b", "c"]}


def test_a_chain_built_without_a_flow_can_be_appended_to_one():
    b, c = add.configure(name="b"), add.configure(name="c")
    chain = load >> (b & c) >> twice
    flow = Flow("fan")
    flow >> chain
    assert deps(flow) == {"load": [], "b": ["load"], "c": ["load"], "double": ["b", "c"]}
    assert deps(Flow("g").add([b, c] >> twice)) == {"b": [], "c": [], "double": ["b", "c"]}


def test_two_different_tasks_with_one_name_are_rejected():
    with pytest.raises(errors.DependencyError, match="two different tasks are named 'add'"):
        Flow("f") >> add(x=1) >> add(x=2)


def test_a_cycle_in_a_flow_is_reported_when_it_becomes_a_workflow():
    flow = Flow("loop")
    flow >> load >> add >> load
    with pytest.raises(errors.CyclicDependencyError, match="load -> add -> load"):
        flow.to_workflow()


def test_a_flow_becomes_an_ordinary_workflow():
    flow = Flow("main")
    flow >> load >> add(x="$node.load.output.n")
    workflow = flow.to_workflow()
    assert isinstance(workflow, Workflow) and workflow.name == "main"
    assert [[n.name for n in level] for level in workflow.get_execution_plan()] == [["load"], ["add"]]


# --------------------------------------------------------------------------- wiring
def test_node_output_references_step_into_keys_and_indices():
    flow = Flow("wire")
    flow >> load >> [add(x="$node.load.output.n", y=40),
                     twice(value="$node.load.output.items.1")]
    result = run(flow)
    assert result.status == "succeeded"
    assert result.output_of("add") == 42 and result.output_of("double") == 40


def test_ctx_input_params_env_and_literal_inputs_are_resolved(monkeypatch):
    monkeypatch.setenv("TOKIWA_TEST_SUFFIX", "!")

    @task
    def greet(name, greeting, suffix, literal, other):
        return f"{greeting} {name}{suffix} {literal} {other}"

    flow = Flow("greet") >> greet(name="$ctx.input.user", greeting="$ctx.params.greeting",
                                  suffix="$env.TOKIWA_TEST_SUFFIX", literal=7, other="$flow.x")
    result = run(flow, {"user": "ann", "greeting": "hi"})
    assert result.output_of("greet") == "hi ann! 7 $flow.x"


def test_unwired_parameters_come_from_params_then_same_named_task_results():
    @task
    def report(load, factor, ctx, default=5):
        assert isinstance(ctx, NodeContext)
        return load["n"] * factor + default

    flow = Flow("auto")
    flow >> load >> report
    assert run(flow, {"factor": 10}).output_of("report") == 25


def test_a_parameter_with_no_source_fails_the_task_naming_it():
    flow = Flow("missing") >> add
    result = run(flow)
    assert result.status == "failed"
    assert result.nodes["add"].error["name"] == "TemplateError"
    assert "parameter 'x' has no value" in result.nodes["add"].error["message"]


def test_a_reference_to_a_missing_key_names_the_reference():
    flow = Flow("bad-ref")
    flow >> load >> add(x="$node.load.output.missing")
    error = run(flow).nodes["add"].error
    assert error["name"] == "TemplateError" and "$node.load.output.missing" in error["message"]


def test_async_task_functions_run_on_the_loop():
    @task
    async def fetch(n):
        await asyncio.sleep(0)
        return n + 1

    assert run(Flow("a") >> fetch(n=1)).output_of("fetch") == 2


def test_pyoco_style_inputs_set_on_the_task_object_are_used():
    @task
    def process(ctx, data):
        return data["n"] * 3

    flow = Flow("hello")
    flow >> load >> process
    process.task.inputs = {"data": "$node.load.output"}
    assert run(flow).output_of("process") == 6


def test_engine_runs_a_plain_workflow_and_refuses_a_running_loop():
    workflow = (Flow("w") >> add(x=1)).to_workflow()
    assert run(workflow).output_of("add") == 2

    async def inside():
        with pytest.raises(errors.StateError, match="run_async"):
            Engine(trace=False).run(workflow)
        return await Engine(trace=False).run_async(workflow)

    assert asyncio.run(inside()).status == "succeeded"


def test_engine_params_must_be_a_dict():
    with pytest.raises(errors.InvalidArgumentError, match="params must be a dict"):
        run(Flow("w") >> add(x=1), params=[1])


# --------------------------------------------------------------------------- trace
DURATION = r"\d+\.\d\d"


def test_cute_trace_lines_by_default(capsys):
    flow = Flow("hello")
    flow >> load >> add(x="$node.load.output.n")
    result = Engine().run(flow)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"🐇 tokiwa > start flow=hello run_id={result.run_id}"
    assert lines[1] == "🏃 start node=load"
    assert re.fullmatch(rf"✅ done node=load \({DURATION} ms\)", lines[2])
    assert lines[3] == "🏃 start node=add"
    assert re.fullmatch(rf"✅ done node=add \({DURATION} ms\)", lines[4])
    assert lines[5:] == ["🥕 done flow=hello"]


def test_plain_trace_lines_with_cute_false(capsys):
    result = Engine(cute=False).run(Flow("hello") >> add(x=1))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"INFO tokiwa start flow=hello run_id={result.run_id}"
    assert lines[1] == "INFO tokiwa start node=add"
    assert re.fullmatch(rf"INFO tokiwa end node=add dur_ms={DURATION}", lines[2])
    assert lines[3:] == ["INFO tokiwa end flow=hello"]


@pytest.mark.parametrize("value", ["0", "false", "NO", "Off"])
def test_tokiwa_cute_env_off_values_select_plain(monkeypatch, value):
    monkeypatch.setenv("TOKIWA_CUTE", value)
    assert Tracer().cute is False


def test_set_plain_switches_every_new_tracer_and_explicit_cute_wins(monkeypatch):
    monkeypatch.setenv("TOKIWA_CUTE", "1")
    Tracer.set_plain()
    assert Tracer().cute is False and Tracer(cute=True).cute is True
    Tracer.set_plain(False)
    assert Tracer().cute is True


def test_error_line_and_no_flow_end_when_a_fail_fast_run_fails():
    @task
    def explode():
        raise ValueError("kaboom")

    out = io.StringIO()
    Engine(stream=out).run(Flow("boom") >> explode)
    assert out.getvalue().splitlines()[1:] == ["🏃 start node=explode", "💥 error node=explode kaboom"]
    plain = io.StringIO()
    Engine(cute=False, stream=plain, fail_fast=False).run(Flow("boom") >> explode)
    assert plain.getvalue().splitlines()[2:] == ["ERROR tokiwa error node=explode kaboom",
                                                 "INFO tokiwa end flow=boom"]


def test_a_retried_node_is_announced_once():
    attempts = []

    @task(retries=2, retry_delay_s=0)
    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("again")
        return "ok"

    out = io.StringIO()
    result = Engine(stream=out).run(Flow("retry") >> flaky)
    assert result.status == "succeeded" and len(attempts) == 3
    assert out.getvalue().count("🏃 start node=flaky") == 1


async def test_the_runner_accepts_a_flow_directly():
    result = await Runner().run(Flow("direct") >> add(x=1))
    assert result.output_of("add") == 2 and result.workflow_name == "direct"
