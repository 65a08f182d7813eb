"""The workflow model: ids, graph validation and execution plans."""

from __future__ import annotations

import uuid

import pytest

from orchestrator.errors import ConflictError, CyclicDependencyError, DependencyError, InvalidArgumentError
from orchestrator.workflow.model import Node, Workflow, detached_node_id, node_id_for, workflow_id_for
from orchestrator.workflow.retry import RetryPolicy


def noop(ctx):
    return None


def names(levels):
    return [[n.name for n in level] for level in levels]


def test_workflow_id_is_uuid5_of_its_name_so_every_host_agrees():
    first = Workflow("order-flow", [Node("a", noop)])
    second = Workflow("order-flow", [Node("a", noop)])
    assert first.id == second.id == workflow_id_for("order-flow")
    assert uuid.UUID(first.id).version == 5
    assert Workflow("other", [Node("a", noop)]).id != first.id


def test_node_id_is_derived_from_workflow_and_node_name_once_added():
    node = Node("validate", noop)
    assert node.id == detached_node_id("validate")
    Workflow("order-flow", [node])
    assert node.id == node_id_for("order-flow", "validate")
    assert node.id != node_id_for("other-flow", "validate")


def test_depends_on_accepts_a_detached_id_taken_before_the_node_was_added():
    validate = Node("validate", noop)
    charge = Node("charge", noop, depends_on=[validate.id])
    flow = Workflow("order-flow", [validate, charge])
    assert names(flow.get_execution_plan()) == [["validate"], ["charge"]]


def test_depends_on_accepts_names_and_attached_ids():
    flow = Workflow("f", [Node("a", noop)])
    flow.add_node(Node("b", noop, depends_on=["a"]))
    flow.add_node(Node("c", noop, depends_on=[flow.get_node("b").id]))
    assert names(flow.get_execution_plan()) == [["a"], ["b"], ["c"]]


def test_execution_plan_groups_nodes_by_longest_dependency_chain():
    flow = Workflow("diamond", [
        Node("a", noop), Node("b", noop, ["a"]), Node("c", noop, ["a"]),
        Node("d", noop, ["b", "c"]), Node("e", noop),
    ])
    assert names(flow.get_execution_plan()) == [["a", "e"], ["b", "c"], ["d"]]


def test_connect_makes_the_second_node_depend_on_the_first():
    flow = Workflow("f")
    a, b = flow.add_node(Node("a", noop)), flow.add_node(Node("b", noop))
    flow.connect("a", b.id)
    flow.connect(a.id, "b")  # a second identical edge changes nothing
    assert b.depends_on == [a.id]
    assert names(flow.get_execution_plan()) == [["a"], ["b"]]


def test_connect_to_an_unknown_node_names_it():
    flow = Workflow("f", [Node("a", noop)])
    with pytest.raises(DependencyError, match="'ghost'") as err:
        flow.connect("a", "ghost")
    assert err.value.nodes == ["ghost"]


def test_unknown_dependency_fails_at_construction_naming_both_nodes():
    with pytest.raises(DependencyError, match="'charge' depends on unknown node.*'missing'") as err:
        Workflow("f", [Node("charge", noop, ["missing"])])
    assert err.value.nodes == ["charge", "missing"]


def test_unknown_dependency_added_later_fails_at_validate():
    flow = Workflow("f")
    flow.add_node(Node("a", noop, ["b"]))
    with pytest.raises(DependencyError, match="'b'"):
        flow.validate()


def test_duplicate_node_name_is_a_dependency_error_naming_it():
    with pytest.raises(DependencyError, match="two nodes named 'a'") as err:
        Workflow("f", [Node("a", noop), Node("a", noop)])
    assert err.value.nodes == ["a"]


def test_cycle_is_reported_with_the_nodes_in_dependency_order():
    flow = Workflow("f")
    for name, dep in [("a", "c"), ("b", "a"), ("c", "b"), ("d", "a")]:
        flow.add_node(Node(name, noop, [dep]))
    with pytest.raises(CyclicDependencyError, match="a -> b -> c -> a") as err:
        flow.validate()
    assert sorted(err.value.nodes) == ["a", "b", "c"]


def test_cycle_through_connect_is_detected():
    flow = Workflow("f", [Node("a", noop), Node("b", noop, ["a"])])
    flow.connect("b", "a")
    with pytest.raises(CyclicDependencyError, match="cycle"):
        flow.get_execution_plan()


def test_a_node_depending_on_itself_is_a_cycle():
    with pytest.raises(CyclicDependencyError, match="'a' depends on itself"):
        Workflow("f", [Node("a", noop, ["a"])])
    flow = Workflow("g", [Node("b", noop)])
    with pytest.raises(CyclicDependencyError):
        flow.connect("b", "b")


def test_a_node_cannot_silently_join_two_workflows():
    node = Node("a", noop)
    Workflow("first", [node])
    with pytest.raises(ConflictError, match="node.copy"):
        Workflow("second", [node])
    assert Workflow("second", [node.copy()]).nodes[0].id == node_id_for("second", "a")


@pytest.mark.parametrize("kwargs, match", [
    ({"name": ""}, "node name"),
    ({"name": "a", "handler": None}, "handler must be callable"),
    ({"name": "a", "handler": noop, "depends_on": "b"}, "depends_on must be a list"),
    ({"name": "a", "handler": noop, "timeout": 0}, "timeout must be a positive"),
    ({"name": "a", "handler": noop, "retry": {"max_attempts": 3}}, "retry must be a RetryPolicy"),
])
def test_bad_node_arguments_are_rejected_with_a_clear_message(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        Node(**kwargs)


def test_workflow_type_must_be_workflow_or_chatflow():
    assert Workflow("c", type="chatflow").type == "chatflow"
    with pytest.raises(InvalidArgumentError, match="'workflow' or 'chatflow'"):
        Workflow("f", type="pipeline")


def test_node_detects_async_handlers_including_async_callable_objects():
    class Handler:
        async def __call__(self, ctx):
            return 1

    async def coro(ctx):
        return 1

    assert Node("a", coro).is_async and Node("b", Handler()).is_async
    assert not Node("c", noop).is_async


def test_node_keeps_its_retry_policy_and_timeout():
    node = Node("charge", noop, retry=RetryPolicy(max_attempts=3), timeout=5)
    assert node.retry.max_attempts == 3 and node.timeout == 5.0


def test_ids_are_pinned_so_a_change_of_namespace_cannot_slip_through():
    # Hosts running different versions must agree: these literals must never change.
    assert workflow_id_for("order-flow") == "8bd5bbac-8e91-5327-b2aa-d70d31ecd9da"
    assert node_id_for("order-flow", "validate") == "376a69bd-415a-5095-8e5f-757093931056"


def test_an_empty_workflow_has_an_empty_plan():
    assert Workflow("empty").get_execution_plan() == []
