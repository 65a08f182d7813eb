"""The standalone pyoco Context: references, artifacts, loop frames and variables."""

from __future__ import annotations

import os

import pytest

from orchestrator.pyoco import Context
from orchestrator.pyoco.core.context import LoopFrame, LoopStack
from orchestrator.pyoco.core.models import RunContext, RunStatus


def test_resolve_reads_node_outputs_params_and_env_and_passes_other_values_through(monkeypatch):
    monkeypatch.setenv("PYOCO_CTX_TEST", "from-os")
    ctx = Context(params={"who": "ann", "a.b": 2}, results={"load": {"n": [5, 6], "obj": RunContext(flow_name="x")}},
                  env={"LOCAL": "from-ctx"})
    assert ctx.resolve("$node.load.output") == ctx.results["load"]
    assert ctx.resolve("$node.load.output.n.1") == 6
    assert ctx.resolve("$node.load.output.obj.flow_name") == "x"
    assert ctx.resolve("$ctx.params.who") == "ann" and ctx.resolve("$ctx.params.a.b") == 2
    assert ctx.resolve("$env.LOCAL") == "from-ctx" and ctx.resolve("$env.PYOCO_CTX_TEST") == "from-os"
    assert ctx.resolve("$unknown.pattern") == "$unknown.pattern" and ctx.resolve("plain") == "plain"
    assert ctx.resolve(7) == 7 and ctx.resolve(None) is None


def test_resolve_reads_scratch_and_results_paths():
    ctx = Context(scratch={"metrics": {"acc": 0.9}}, results={"train": {"loss": 0.1}})
    assert ctx.resolve("$ctx.scratch.metrics.acc") == 0.9
    assert ctx.resolve("$ctx.results.train.loss") == 0.1


@pytest.mark.parametrize("ref", ["$node.missing.output", "$ctx.params.missing", "$env.PYOCO_SURELY_UNSET_VAR",
                                 "$ctx.scratch.nope"])
def test_resolve_of_something_missing_is_a_key_error(ref):
    with pytest.raises(KeyError):
        Context().resolve(ref)


def test_save_artifact_writes_text_bytes_and_objects_and_records_path_and_type(tmp_path):
    ctx = Context(artifact_dir=str(tmp_path / "art"))
    text = ctx.save_artifact("a.txt", "hello")
    raw = ctx.save_artifact("bin/b.bin", b"\x00\x01")
    obj = ctx.save_artifact("c.json", {"a": 1})
    assert text == str(tmp_path / "art" / "a.txt") and open(text).read() == "hello"
    assert open(raw, "rb").read() == b"\x00\x01" and os.path.dirname(raw).endswith("bin")
    assert open(obj).read() == "{'a': 1}"
    assert ctx.artifacts == {"a.txt": {"path": text, "type": "str"}, "bin/b.bin": {"path": raw, "type": "bytes"},
                             "c.json": {"path": obj, "type": "object"}}


def test_building_a_context_creates_no_directory_until_an_artifact_is_saved(tmp_path):
    target = tmp_path / "later"
    ctx = Context(artifact_dir=str(target))
    assert not target.exists()
    ctx.save_artifact("x.txt", 12)
    assert (target / "x.txt").read_text() == "12" and ctx.artifacts["x.txt"]["type"] == "int"


def test_default_artifact_dir_is_pyoco_one():
    assert Context().artifact_dir == "./artifacts"


def test_is_cancelled_follows_the_run_status():
    run = RunContext()
    ctx = Context(run_context=run)
    assert ctx.is_cancelled is False and Context().is_cancelled is False
    run.status = RunStatus.CANCELLING
    assert ctx.is_cancelled is True


def test_loop_stack_builds_paths_and_refuses_to_pop_an_empty_stack():
    stack = LoopStack()
    assert stack.push(LoopFrame("outer", "repeat", index=0)).path == "outer[0]"
    inner = stack.push(LoopFrame("inner", "foreach", index=3))
    assert inner.path == "outer[0].inner[3]" and stack.current is inner
    assert stack.pop() is inner and len(stack.snapshot()) == 1
    stack.pop()
    with pytest.raises(RuntimeError, match="underflow"):
        stack.pop()


def test_variables_and_expression_data():
    ctx = Context(params={"p": 1})
    ctx.set_var("item", 3)
    data = ctx.expression_data()
    assert data["item"] == 3 and data["params"] == {"p": 1} and data["loop"] is None
    ctx.clear_var("item")
    assert ctx.get_var("item", "gone") == "gone"
