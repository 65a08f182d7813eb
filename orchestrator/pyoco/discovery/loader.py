"""``TaskLoader``: the tasks of a config, by name, and of the installed plug-ins.

Load order (as pyoco): explicit ``tasks.<name>.callable`` entries first (they always win),
then ``discovery.packages`` (every module of each package), ``discovery.entry_points``
(module names), ``discovery.glob_modules`` (file globs relative to the working directory),
then the entry-point plug-ins (:mod:`orchestrator.pyoco.discovery.plugins`). A later task of
a name already found replaces it with a warning, or raises in ``strict`` mode. A config's
``inputs`` / ``outputs`` for a name without ``callable`` are added to the discovered task.
Each plug-in leaves a report in ``plugin_reports``: ``name``, ``value``, ``module``, ``group``,
``tasks`` (``name``, ``origin``, ``class``, ``warnings``), ``warnings`` (the plug-in's own, such
as "no tasks registered") and ``error`` when its hook failed.

``TaskLoader.from_plugins()`` loads the plug-ins only (what ``tokiwa-producer plugins`` shows).
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import logging
import os
import pkgutil
import sys
from types import ModuleType, SimpleNamespace
from typing import Any

from orchestrator.pyoco._alias import install_alias
from orchestrator.pyoco.core.models import Task
from orchestrator.pyoco.discovery.plugins import PluginRegistry, iter_entry_points
from orchestrator.pyoco.dsl.syntax import TaskWrapper

logger = logging.getLogger("tokiwa.plugins")


def _empty_config() -> Any:
    return SimpleNamespace(tasks={}, discovery=SimpleNamespace(entry_points=[], packages=[], glob_modules=[]))


class TaskLoader:
    def __init__(self, config: Any, strict: bool = False) -> None:
        self.config = config if config is not None else _empty_config()
        self.strict = strict
        self.tasks: dict[str, Task] = {}
        self._explicit_tasks: set[str] = set()
        self.plugin_reports: list[dict[str, Any]] = []
        self.errors: list[str] = []

    @classmethod
    def from_plugins(cls, strict: bool = False) -> TaskLoader:
        """A loader that has loaded the installed plug-ins (and nothing else)."""
        loader = cls(None, strict=strict)
        loader._load_entry_point_plugins()
        return loader

    def load(self) -> dict[str, Task]:
        config = self.config
        for name, conf in (getattr(config, "tasks", None) or {}).items():
            if getattr(conf, "callable", None):
                self._load_explicit_task(name, conf)
        discovery = getattr(config, "discovery", None)
        for package in getattr(discovery, "packages", None) or []:
            self._load_package(package)
        for module in getattr(discovery, "entry_points", None) or []:
            self._load_module(module)
        for pattern in getattr(discovery, "glob_modules", None) or []:
            self._load_glob(pattern)
        self._load_entry_point_plugins()
        return self.tasks

    def get_task(self, name: str) -> Task | None:
        return self.tasks.get(name)

    def _register_task(self, name: str, task: Task) -> None:
        if name in self.tasks:
            if name in self._explicit_tasks:
                return  # the config's explicit task wins
            message = f"Task '{name}' already defined."
            if self.strict:
                raise ValueError(f"{message} (Strict mode enabled)")
            logger.warning("%s Overwriting.", message)
        conf = (getattr(self.config, "tasks", None) or {}).get(name)
        if conf is not None and not getattr(conf, "callable", None):
            task.inputs.update(getattr(conf, "inputs", None) or {})
            task.outputs.extend(getattr(conf, "outputs", None) or [])
        self.tasks[name] = task

    def _problem(self, message: str) -> None:
        if self.strict:
            raise ImportError(message)
        self.errors.append(message)
        logger.warning("%s", message)

    def _load_package(self, package: str) -> None:
        try:
            pkg = importlib.import_module(package)
        except ImportError as exc:
            self._problem(f"could not import package {package}: {exc}")
            return
        if not hasattr(pkg, "__path__"):
            self._scan(pkg)
            return
        for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
            self._load_module(info.name)

    def _load_module(self, module: str) -> None:
        try:
            self._scan(importlib.import_module(module))
        except ImportError as exc:
            self._problem(f"could not import module {module}: {exc}")

    def _load_glob(self, pattern: str) -> None:
        for path in sorted(glob.glob(pattern, recursive=True)):
            relative = os.path.relpath(path)
            if not path.endswith(".py") or relative.startswith(".."):
                continue  # outside the working directory: no module name for it
            self._load_module(relative[:-3].replace(os.sep, "."))

    def _scan(self, module: ModuleType) -> None:
        for name, obj in vars(module).items():
            if isinstance(obj, TaskWrapper):
                self._register_task(name, obj.task)
            elif isinstance(obj, Task):
                self._register_task(name, obj)

    def _load_explicit_task(self, name: str, conf: Any) -> None:
        module_name, _, attr = str(conf.callable).partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            self._problem(f"task {name}: cannot load callable {conf.callable!r}: {exc}")
            return
        func = obj.task.func if isinstance(obj, TaskWrapper) else obj.func if isinstance(obj, Task) else obj
        task = Task(func=func, name=name, inputs=dict(getattr(conf, "inputs", None) or {}),
                    outputs=list(getattr(conf, "outputs", None) or []))
        for option in ("retries", "timeout_sec", "fail_policy"):
            value = getattr(conf, option, None)
            if value is not None:
                setattr(task, option, value)
        self.tasks[name] = task
        self._explicit_tasks.add(name)

    def _load_entry_point_plugins(self) -> None:
        for ep in iter_entry_points():
            info: dict[str, Any] = {"name": ep.name, "value": ep.value, "module": getattr(ep, "module", ""),
                                    "group": getattr(ep, "group", ""), "tasks": [], "warnings": []}
            registry = PluginRegistry(self, ep.name)
            try:
                if info["group"] == "pyoco.tasks":
                    _alias_for_pyoco_plugins()
                hook = ep.load()
                if not callable(hook):
                    raise TypeError(f"entry point {ep.value!r} is not callable: it must be a hook(registry)")
                hook(registry)
            except Exception as exc:  # noqa: BLE001 - a broken plug-in is reported, not fatal
                info["error"] = str(exc) or type(exc).__name__
                if self.strict:
                    raise
                logger.warning("plug-in %r failed to load: %s", ep.name, info["error"])
            info["tasks"] = list(registry.records)  # each with its own warnings
            if "error" not in info and not registry.records:
                info["warnings"].append("no tasks registered")
            self.plugin_reports.append(info)


def _alias_for_pyoco_plugins() -> None:
    """A ``pyoco.tasks`` plug-in imports ``pyoco``: without the real pyoco installed, that
    means this surface (:mod:`orchestrator.pyoco.alias`)."""
    if "pyoco" not in sys.modules and importlib.util.find_spec("pyoco") is None:
        install_alias()


def plugin_tasks(strict: bool = False) -> dict[str, Task]:
    """The tasks of the installed plug-ins, by name (use them in flows: ``flow >> TaskWrapper(t)``)."""
    return TaskLoader.from_plugins(strict=strict).tasks
