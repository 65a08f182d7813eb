"""pyoco's control flow on tokiwa: repeat, for-each, until, switch, the expression language and
FlowValidator."""

from __future__ import annotations

import pytest

from orchestrator import errors
from orchestrator.pyoco import Engine, Flow, RunStatus, switch, task
from orchestrator.pyoco.core.exceptions import FlowValueTypeError, UntilMaxIterationsExceeded
from orchestrator.pyoco.dsl.expressions import Expression, ExpressionEvaluationError, ExpressionSyntaxError
from orchestrator.pyoco.dsl.nodes import ForEachNode, RepeatNode, SwitchNode, TaskNode, UntilNode
from orchestrator.pyoco.dsl.validator import FlowValidator
from orchestrator.pyoco.trace.console import SilentTraceBackend


def run(flow, params=None):
    return Engine(SilentTraceBackend()).run(flow, params)


def test_fragments_build_dsl_nodes():
    @task
    def a(ctx):
        pass

    @task
    def b(ctx):
        pass

    assert [type(s) for s in (a >> b).to_subflow().steps] == [TaskNode, TaskNode] and a.task in b.task.dependencies
    repeat = (a >> b)[3].to_subflow().steps[0]
    assert isinstance(repeat, RepeatNode) and repeat.count == 3 and len(repeat.body.steps) == 2
    each = a["$ctx.params.items as item"].to_subflow().steps[0]
    assert isinstance(each, ForEachNode) and each.alias == "item" and each.source.source == "$ctx.params.items"
    until = a % ("$ctx.results.a > 1", 5)
    node = until.to_subflow().steps[0]
    assert isinstance(node, UntilNode) and node.max_iter == 5
    cases = switch("$ctx.params.mode")[("x" >> a, "*" >> b)].to_subflow().steps[0]
    assert isinstance(cases, SwitchNode) and [c.value for c in cases.cases] == ["x", "__default__"]


def test_repeat_runs_the_body_n_times_with_loop_frames():
    seen = []

    @task
    def tick(ctx):
        seen.append((ctx.loop.index, ctx.loop.iteration, ctx.loop.count, ctx.loop.path))
        return len(seen)

    ctx = run(Flow("repeat") >> tick[3])
    assert seen == [(0, 1, 3, "repeat[0]"), (1, 2, 3, "repeat[1]"), (2, 3, 3, "repeat[2]")]
    assert ctx.results["tick"] == 3 and ctx.run_context.status == RunStatus.COMPLETED


def test_repeat_count_may_be_an_expression():
    counts = []

    @task
    def tick(ctx):
        counts.append(1)

    run(Flow("repeat_expr") >> tick[Expression("$ctx.params.n + 1")], {"n": 1})
    assert len(counts) == 2


def test_for_each_iterates_a_list_with_its_alias_and_clears_it_after():
    seen = []

    @task
    def record(ctx):
        seen.append((ctx.loop.index, ctx.loop.item, ctx.get_var("item")))

    ctx = run(Flow("each") >> record["$ctx.params.items as item"], {"items": ["x", "y"]})
    assert seen == [(0, "x", "x"), (1, "y", "y")] and ctx.get_var("item") is None


def test_for_each_over_something_else_than_a_list_is_a_type_error():
    @task
    def record(ctx):
        pass

    with pytest.raises(TypeError) as info:
        run(Flow("bad_each") >> record["$ctx.params.items"], {"items": "abc"})
    assert isinstance(info.value, FlowValueTypeError)


def test_until_repeats_until_the_condition_holds_and_fails_after_max_iter():
    @task
    def bump(ctx):
        ctx.scratch["n"] = ctx.scratch.get("n", 0) + 1
        return ctx.scratch["n"]

    ctx = run(Flow("until") >> bump % ("$ctx.results.bump >= 3", 10))
    assert ctx.results["bump"] == 3
    with pytest.raises(UntilMaxIterationsExceeded, match="max_iter=2"):
        run(Flow("until_max") >> bump % ("$ctx.scratch.n > 100", 2))


def test_switch_runs_the_matching_case_else_the_default_else_nothing():
    events = []

    @task
    def on_x(ctx):
        events.append("x")

    @task
    def fallback(ctx):
        events.append("default")

    flow = Flow("switch") >> switch("$ctx.params.mode")[("x" >> on_x, "*" >> fallback)]
    run(flow, {"mode": "x"})
    run(flow, {"mode": "z"})
    run(Flow("switch_nodefault") >> switch("$ctx.params.mode")["x" >> on_x], {"mode": "z"})
    assert events == ["x", "default"]


def test_a_control_flow_run_raises_a_task_error_and_marks_the_run_failed():
    @task
    def first(ctx):
        return 1

    @task
    def boom(ctx):
        raise KeyError("missing")

    flow = Flow("cf_fail") >> first >> boom[2]
    with pytest.raises(KeyError, match="missing"):
        run(flow)


def test_expressions_read_ctx_and_env_paths():
    expr = Expression("$ctx.value > 5 and $env.MODE == 'prod' and $ctx.kind in ('a', 'b')")
    assert expr.evaluate(ctx={"value": 10, "kind": "a"}, env={"MODE": "prod"}) is True
    assert Expression("$ctx.obj.items.1 * 2").evaluate(ctx={"obj": {"items": {"1": 4}}}) == 8


@pytest.mark.parametrize("source", ["$unknown.x", "_ctx('value')", "__import__('os')", "$ctx.a.__class__()",
                                    "[x for x in $ctx.a]", "$ctx.a if 1 else 2", "lambda: 1"])
def test_expressions_refuse_everything_else(source):
    with pytest.raises(ExpressionSyntaxError):
        Expression(source)


def test_a_missing_path_or_a_private_attribute_fails_when_evaluated():
    with pytest.raises(ExpressionEvaluationError, match="not found"):
        Expression("$ctx.value").evaluate(ctx={})
    with pytest.raises(ExpressionEvaluationError):
        Expression("$ctx.obj.__dict__").evaluate(ctx={"obj": object()})


def test_validator_reports_unbounded_until_duplicate_cases_and_missing_defaults():
    @task
    def a(ctx):
        pass

    warn = FlowValidator(Flow("w") >> a % "$ctx.loop.iteration > 1").validate()
    assert warn.status == "warning" and any("missing max_iter" in w for w in warn.warnings)
    dup = FlowValidator(Flow("d") >> switch("$ctx.params.f")[("X" >> a, "X" >> a)]).validate()
    assert dup.status == "error" and any("Duplicate switch value" in e for e in dup.errors)
    assert any("no default" in w for w in dup.warnings)
    two = FlowValidator(Flow("t") >> switch("$ctx.params.f")[("*" >> a, "*" >> a)]).validate()
    assert any("Multiple default" in e for e in two.errors)
    assert FlowValidator(Flow("ok") >> a).validate().to_dict() == {"status": "ok", "warnings": [], "errors": []}


def test_bad_loop_selectors_are_clear_errors():
    @task
    def a(ctx):
        pass

    with pytest.raises(errors.InvalidArgumentError, match=">= 0"):
        a[-1]
    with pytest.raises(errors.InvalidArgumentError, match="alias"):
        a["$ctx.params.items as params"]
    with pytest.raises(errors.InvalidArgumentError, match="max_iter"):
        a % ("$ctx.x", 0)
    with pytest.raises(errors.InvalidArgumentError, match="at least one case"):
        switch("$ctx.x")[()]
