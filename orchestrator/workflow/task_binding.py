"""How a pyoco-style task function is called from a node: its keyword arguments.

For each parameter of the function, on every attempt:

1. an ``inputs`` entry wins; ``$`` references in it are resolved (below), other values are
   passed as they are;
2. a parameter named ``ctx`` receives the :class:`~orchestrator.workflow.context.NodeContext`;
3. otherwise it is auto-wired, as pyoco does: from the run parameter of the same name, else
   from the output of the task of the same name, else its Python default; with none of
   these the attempt fails with a TemplateError naming the parameter.

References: ``$node.NAME.output`` (then ``.key`` steps into dicts, list indices or
attributes), ``$ctx.input.KEY`` / ``$ctx.params.KEY`` (the run's input), ``$ctx.context.KEY``,
``$ctx.memory.KEY``, ``$ctx.results.NAME`` (same as ``$node.NAME.output``) and
``$env.NAME``. Any other string, including other ``$…`` forms, passes through unchanged.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.callbacks import is_async_callable
from orchestrator.errors import TemplateError

if TYPE_CHECKING:
    from orchestrator.workflow.context import NodeContext
    from orchestrator.workflow.flow import Task

_MISSING = object()


def _walk(value: Any, steps: list[str], ref: str) -> Any:
    for step in steps:
        if isinstance(value, Mapping):
            if step not in value:
                raise TemplateError(f"{ref}: no key {step!r} (keys: {', '.join(map(str, value)) or 'none'})",
                                    name=ref)
            value = value[step]
        elif isinstance(value, (list, tuple)) and step.lstrip("-").isdigit():
            try:
                value = value[int(step)]
            except IndexError:
                raise TemplateError(f"{ref}: index {step} is out of range", name=ref) from None
        else:
            try:
                value = getattr(value, step)
            except AttributeError:
                raise TemplateError(f"{ref}: {type(value).__name__} has no {step!r}", name=ref) from None
    return value


def _node_output(ctx: NodeContext, name: str, ref: str, task_name: str) -> Any:
    if not ctx.has_result(name):
        raise TemplateError(
            f"task {task_name!r}: {ref} has no value: task {name!r} has not produced an output "
            f"(is it in the flow, and upstream of {task_name!r}?)", name=ref)
    return ctx.get_result(name)


def resolve_reference(value: Any, ctx: NodeContext, task_name: str) -> Any:
    """The value an ``inputs`` entry stands for (see the module doc)."""
    if not isinstance(value, str) or not value.startswith("$"):
        return value
    parts = value[1:].split(".")
    head = parts[0]
    if head == "node" and len(parts) >= 3 and parts[2] == "output":
        return _walk(_node_output(ctx, parts[1], value, task_name), parts[3:], value)
    if head == "env" and len(parts) == 2:
        if parts[1] not in os.environ:
            raise TemplateError(f"task {task_name!r}: environment variable {parts[1]!r} is not set", name=value)
        return os.environ[parts[1]]
    if head == "ctx" and len(parts) >= 2:
        root = parts[1]
        if root in ("input", "params"):
            return _walk(ctx.input, parts[2:], value)
        if root == "context":
            return _walk(ctx.context, parts[2:], value)
        if root == "memory":
            return _walk(ctx.memory, parts[2:], value)
        if root == "results" and len(parts) >= 3:
            return _walk(_node_output(ctx, parts[2], value, task_name), parts[3:], value)
    return value


def bind_arguments(task: Task, ctx: NodeContext) -> dict[str, Any]:
    """The keyword arguments for one call of ``task.func``."""
    kwargs: dict[str, Any] = {}
    params = ctx.params
    for name, param in task.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            for key, raw in task.inputs.items():
                if key not in task.signature.parameters:
                    kwargs[key] = resolve_reference(raw, ctx, task.name)
            continue
        if name in task.inputs:
            kwargs[name] = resolve_reference(task.inputs[name], ctx, task.name)
        elif name == "ctx":
            kwargs[name] = ctx
        elif name in params:
            kwargs[name] = params[name]
        elif name != task.name and ctx.has_result(name):
            kwargs[name] = ctx.get_result(name)
        elif param.default is inspect.Parameter.empty:
            raise TemplateError(
                f"task {task.name!r}: parameter {name!r} has no value: wire it with "
                f"{task.name}({name}='$node.OTHER.output'), pass a run parameter {name!r}, "
                f"or give it a default", name=name)
    return kwargs


def build_handler(task: Task) -> Callable[[Any], Any]:
    """A node handler (async if the function is) that calls ``task.func`` with bound arguments."""
    func = task.func
    handler: Callable[[NodeContext], Any]
    if is_async_callable(func):
        async def handler(ctx: NodeContext) -> Any:
            return await func(**bind_arguments(task, ctx))
    else:
        def handler(ctx: NodeContext) -> Any:
            return func(**bind_arguments(task, ctx))
    handler.__name__ = f"task_{task.name}"
    handler.__qualname__ = handler.__name__
    return handler
