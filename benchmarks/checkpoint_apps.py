"""The worker app of ``checkpoint_bench``: the same three-node no-op chain registered twice,
``bench-ck3`` (checkpointed, on ``bench.ck``) and ``bench-plain3`` (``checkpoint=False``, on
``bench.plain``), so both variants run in the same worker with the same routes."""

from __future__ import annotations

from orchestrator import Node, Orchestrator, Workflow


async def _step(ctx):
    return {"ok": True}


def three_nodes(name: str, checkpoint: bool) -> Workflow:
    return Workflow(name, [Node("a", _step), Node("b", _step, ["a"]), Node("c", _step, ["b"])], checkpoint=checkpoint)


app = Orchestrator(mode="worker")
app.register_workflow(three_nodes("bench-ck3", True), trigger={"type": "event", "event_type": "bench.ck"})
app.register_workflow(three_nodes("bench-plain3", False), trigger={"type": "event", "event_type": "bench.plain"})
