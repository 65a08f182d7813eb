"""Task plug-ins: the registry's forms and warnings, the loader's reports, config files."""

from __future__ import annotations

from types import SimpleNamespace
from unittest.mock import patch

import pytest

from orchestrator import errors
from orchestrator.pyoco import Task, task
from orchestrator.pyoco.discovery import loader as loader_module
from orchestrator.pyoco.discovery.loader import TaskLoader
from orchestrator.pyoco.discovery.plugins import CALLABLE_WARNING, PluginRegistry
from orchestrator.pyoco.schemas.config import DiscoveryConfig, PyocoConfig
from orchestrator.workflow import flow as tokiwa_flow


class Vision(Task):
    def __init__(self):
        super().__init__(func=self.run, name="vision")

    def run(self, ctx):
        return "bunny"


def registry():
    loader = TaskLoader(None)
    return loader, PluginRegistry(loader, "demo")


def test_a_task_subclass_registers_without_warnings():
    loader, reg = registry()
    reg.task_class(Vision)
    assert isinstance(loader.tasks["vision"], Vision)
    assert reg.records == [{"name": "vision", "origin": "task_class", "class": "Vision", "warnings": []}]
    assert reg.warnings == []


def test_a_callable_is_accepted_with_the_warning():
    loader, reg = registry()

    @reg.task(name="ext")
    def ext(ctx):
        return "ok"

    reg.add(lambda ctx: 1, name="lam")
    assert set(loader.tasks) == {"ext", "lam"}
    assert [r["origin"] for r in reg.records] == ["callable", "callable"]
    assert reg.warnings == [f"ext: {CALLABLE_WARNING}", f"lam: {CALLABLE_WARNING}"]


def test_a_plain_task_a_wrapper_and_tokiwas_own_task_are_accepted():
    loader, reg = registry()
    reg.add(Task(func=lambda ctx: None, name="legacy"))

    @task
    def wrapped(ctx):
        return 1

    @tokiwa_flow.task(retries=2)
    def native(x):
        return x

    reg.add(wrapped)
    reg.add(native)
    assert [r["origin"] for r in reg.records] == ["task", "wrapper", "wrapper"]
    assert any("plain Task" in w for w in reg.warnings) and len(reg.warnings) == 1
    assert loader.tasks["native"].retries == 2 and loader.tasks["native"].func(x=3) == 3


def test_bad_registrations_are_clear_errors():
    _, reg = registry()
    with pytest.raises(errors.InvalidArgumentError, match="not a subclass"):
        reg.task_class(dict)
    with pytest.raises(errors.InvalidArgumentError, match="cannot register"):
        reg.add(42)


def entry_point(name, hook, group="tokiwa.tasks"):
    return SimpleNamespace(name=name, value=f"pkg:{getattr(hook, '__name__', 'hook')}", module="pkg", group=group,
                           load=lambda: hook)


def test_the_loader_reports_each_plugin_its_tasks_errors_and_empty_hooks():
    def good(reg):
        reg.task_class(Vision)

    def broken(reg):
        raise RuntimeError("boom")

    def empty(reg):
        pass

    eps = [entry_point("good", good), entry_point("broken", broken), entry_point("empty", empty),
           entry_point("notcallable", 3)]
    with patch.object(loader_module, "iter_entry_points", return_value=eps):
        loader = TaskLoader.from_plugins()
    reports = {r["name"]: r for r in loader.plugin_reports}
    assert list(loader.tasks) == ["vision"] and reports["good"]["tasks"][0]["origin"] == "task_class"
    assert reports["broken"]["error"] == "boom" and reports["empty"]["warnings"] == ["no tasks registered"]
    assert "not callable" in reports["notcallable"]["error"]
    with patch.object(loader_module, "iter_entry_points", return_value=[entry_point("broken", broken)]), \
            pytest.raises(RuntimeError, match="boom"):
        TaskLoader(None, strict=True).load()


def test_a_config_file_loads_explicit_tasks_with_options_and_refuses_unknown_keys(tmp_path, monkeypatch):
    (tmp_path / "mytasks.py").write_text("def double(x):\n    return x * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config_file = tmp_path / "flow.yaml"
    config_file.write_text("version: 1\nflows:\n  main:\n    graph: double\n"
                           "tasks:\n  double:\n    callable: mytasks:double\n    retries: 2\n"
                           "    inputs: {x: $ctx.params.x}\n")
    config = PyocoConfig.from_yaml(config_file)
    with patch.object(loader_module, "iter_entry_points", return_value=[]):
        tasks = TaskLoader(config).load()
    assert tasks["double"].retries == 2 and tasks["double"].inputs == {"x": "$ctx.params.x"}
    assert config.flows["main"].graph == "double" and config.discovery == DiscoveryConfig()
    config_file.write_text("version: 1\ntasks:\n  double:\n    callable: mytasks:double\n    save: yes\n")
    with pytest.raises(errors.ConfigError, match="unknown key"):
        PyocoConfig.from_yaml(config_file)
