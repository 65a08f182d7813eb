"""Entry-point plug-ins: packages that bring their own tasks.

A package declares a hook in its ``pyproject.toml``::

    [project.entry-points."tokiwa.tasks"]       # or pyoco's group, "pyoco.tasks"
    vision = "tokiwa_vision.entrypoint:register_tasks"

and the hook registers tasks on the :class:`PluginRegistry` it is called with::

    class ImageClassify(Task):                   # orchestrator.pyoco.Task: preferred
        def __init__(self):
            super().__init__(func=self.run, name="image_classify")
        def run(self, ctx, image_path): ...

    def register_tasks(registry):
        registry.task_class(ImageClassify)

``registry.add(obj)`` takes a Task, a ``@task`` wrapper (pyoco's or tokiwa's own) or a plain
callable; ``registry.task(name=...)`` and ``registry.register_callable(fn)`` register a
callable. Every callable registration is accepted with the warning "registered via callable;
prefer Task subclass for extensibility". Other warnings: a plain ``Task`` instance, a
non-callable ``func``, a missing name (auto-named ``<provider>_<n>``), a hook that registers
nothing. ``tokiwa-producer plugins list`` shows what is installed, ``plugins lint`` exits 1
on any warning or error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import metadata
from typing import Any

from orchestrator.errors import InvalidArgumentError
from orchestrator.pyoco.core.models import Task
from orchestrator.pyoco.dsl.syntax import TaskWrapper

#: the entry-point groups read, in order (a plug-in listed in both is loaded once)
GROUPS = ("tokiwa.tasks", "pyoco.tasks")
CALLABLE_WARNING = "registered via callable; prefer Task subclass for extensibility"
logger = logging.getLogger("tokiwa.plugins")


class CallablePluginTask(Task):
    """The Task a callable registration becomes (so every plug-in task is a Task)."""

    def __init__(self, func: Callable[..., Any], name: str) -> None:
        super().__init__(func=func, name=name)


def iter_entry_points(group: str | None = None) -> list[Any]:
    """The installed entry points of ``group``, or of every group in :data:`GROUPS`."""
    found: list[Any] = []
    seen: set[tuple[str, str]] = set()
    for name in (group,) if group else GROUPS:
        for ep in metadata.entry_points(group=name):
            if (ep.name, ep.value) not in seen:
                seen.add((ep.name, ep.value))
                found.append(ep)
    return found


def list_available_plugins() -> list[dict[str, Any]]:
    return [{"name": ep.name, "module": getattr(ep, "module", ""), "value": ep.value, "group": getattr(ep, "group", "")}
            for ep in iter_entry_points()]


def _from_tokiwa(obj: Any) -> Task | None:
    """tokiwa's own ``@task`` wrapper or Task (orchestrator.workflow.flow) as a pyoco Task."""
    from orchestrator.workflow import flow as tokiwa_flow

    source = obj.task if isinstance(obj, tokiwa_flow.TaskWrapper) else obj
    if not isinstance(source, tokiwa_flow.Task):
        return None
    return Task(func=source.func, name=source.name, inputs=dict(source.inputs), retries=source.retries,
                timeout_sec=source.timeout_sec)


class PluginRegistry:
    """What a plug-in hook registers its tasks on (``loader`` needs ``_register_task(name, task)``)."""

    def __init__(self, loader: Any, provider_name: str) -> None:
        self.loader = loader
        self.provider_name = provider_name
        self.registered_names: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.warnings: list[str] = []

    def task(self, func: Callable[..., Any] | None = None, *, name: str | None = None,
             inputs: dict[str, Any] | None = None, outputs: list[str] | None = None) -> Any:
        """``@registry.task`` / ``@registry.task(name=...)``: register a callable (with the warning)."""
        def register(inner: Callable[..., Any]) -> Callable[..., Any]:
            self.register_callable(inner, name=name, inputs=inputs, outputs=outputs)
            return inner

        return register if func is None else register(func)

    def register_callable(self, func: Callable[..., Any], *, name: str | None = None,
                          inputs: dict[str, Any] | None = None, outputs: list[str] | None = None) -> Task:
        task = CallablePluginTask(func=func, name=name or getattr(func, "__name__", "") or "")
        task.inputs.update(inputs or {})
        task.outputs.extend(outputs or [])
        self._finalize(task, "callable")
        return task

    def task_class(self, task_cls: type[Task], *args: Any, name: str | None = None, **kwargs: Any) -> Task:
        """Build ``task_cls(*args, **kwargs)`` (a Task subclass: the recommended form) and register it."""
        if not (isinstance(task_cls, type) and issubclass(task_cls, Task)):
            raise InvalidArgumentError(f"{task_cls!r} is not a subclass of orchestrator.pyoco Task")
        task = task_cls(*args, **kwargs)
        if name:
            task.name = name
        self._finalize(task, "task_class")
        return task

    def add(self, obj: Any, *, name: str | None = None) -> None:
        """Register a Task, a ``@task`` wrapper (pyoco's or tokiwa's) or, with the warning, a callable."""
        if isinstance(obj, TaskWrapper):
            task, origin = obj.task, "wrapper"
        elif isinstance(obj, Task):
            task, origin = obj, "task" if type(obj) is Task else "task_class"
        elif (converted := _from_tokiwa(obj)) is not None:
            task, origin = converted, "wrapper"
        elif callable(obj):
            self.register_callable(obj, name=name)
            return
        else:
            raise InvalidArgumentError(f"cannot register {obj!r}: expected a Task, a @task function or a callable")
        if name:
            task.name = name
        self._finalize(task, origin)

    def _finalize(self, task: Task, origin: str) -> None:
        warnings = self._check(task, origin)
        self.loader._register_task(task.name, task)
        self.registered_names.append(task.name)
        self.records.append({"name": task.name, "origin": origin, "class": type(task).__name__, "warnings": warnings})
        self.warnings.extend(f"{task.name}: {message}" for message in warnings)

    def _check(self, task: Task, origin: str) -> list[str]:
        warnings = []
        if not getattr(task, "name", None):
            task.name = f"{self.provider_name}_{len(self.registered_names) + 1}"
            warnings.append(f"name missing; auto-assigned '{task.name}'")
        if not callable(getattr(task, "func", None)):
            warnings.append("task.func is not callable")
        if origin == "callable":
            warnings.append(CALLABLE_WARNING)
        if type(task) is Task and origin == "task":
            warnings.append("plain Task instance detected; subclass Task for metadata support")
        for message in warnings:
            logger.warning("plug-in %s, task %s: %s", self.provider_name, task.name, message)
        return warnings
