"""``tokiwa-producer plugins list|lint`` against plug-ins installed as real distributions
(a dist-info folder with entry_points.txt on PYTHONPATH), and their tasks run in a flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.procs import ROOT

TOKIWA_PLUGINS = '''
from orchestrator.pyoco import Task

class Vision(Task):
    def __init__(self):
        super().__init__(func=self.run, name="vision")

    def run(self, ctx, image="cat.png"):
        return f"bunny in {image}"

def register_good(registry):
    registry.task_class(Vision)

def register_legacy(registry):
    @registry.task(name="legacy_fn")
    def legacy(ctx):
        return 1

def register_nothing(registry):
    pass
'''

PYOCO_PLUGIN = '''
from pyoco.core.models import Task   # a plug-in written for pyoco, unchanged

class Resize(Task):
    def __init__(self):
        super().__init__(func=self.run, name="resize")

    def run(self, ctx):
        return "resized"

def register(registry):
    registry.task_class(Resize)
'''


def install(site: Path, entry_points: str) -> None:
    site.mkdir()
    (site / "demo_plugins.py").write_text(TOKIWA_PLUGINS)
    (site / "pyoco_style_plugin.py").write_text(PYOCO_PLUGIN)
    info = site / "demo_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def producer(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli.producer", "plugins", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def plugin_env(tmp_path, subprocess_env):
    def make(entry_points: str) -> dict[str, str]:
        site = tmp_path / f"site{len(list(tmp_path.iterdir()))}"
        install(site, entry_points)
        return {**subprocess_env, "PYTHONPATH": os.pathsep.join([str(site), subprocess_env["PYTHONPATH"]])}
    return make


MIXED = ("[tokiwa.tasks]\ngood = demo_plugins:register_good\nlegacy = demo_plugins:register_legacy\n\n"
         "[pyoco.tasks]\nresize = pyoco_style_plugin:register\n")
CLEAN = "[tokiwa.tasks]\ngood = demo_plugins:register_good\n\n[pyoco.tasks]\nresize = pyoco_style_plugin:register\n"


def test_plugins_list_shows_each_plugin_its_group_tasks_and_origins(plugin_env):
    env = plugin_env(MIXED)
    result = producer(env, "list", "--json")
    assert result.returncode == 0, result.stderr
    reports = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(reports) == {"good", "legacy", "resize"}
    assert reports["good"]["group"] == "tokiwa.tasks" and reports["resize"]["group"] == "pyoco.tasks"
    assert [(t["name"], t["origin"], t["warnings"]) for t in reports["good"]["tasks"]] == [("vision", "task_class", [])]
    assert reports["resize"]["tasks"][0]["class"] == "Resize" and "error" not in reports["resize"]
    assert reports["legacy"]["tasks"][0]["origin"] == "callable"
    text = producer(env, "list")
    assert text.returncode == 0
    assert "• vision [task_class] (ok)" in text.stdout
    assert "• legacy_fn [callable] (registered via callable; prefer Task subclass for extensibility)" in text.stdout


def test_plugins_lint_exits_1_and_names_a_callable_registration(plugin_env):
    result = producer(plugin_env(MIXED), "lint")
    assert result.returncode == 1
    assert "legacy.legacy_fn: registered via callable; prefer Task subclass for extensibility" in result.stdout
    as_json = producer(plugin_env(MIXED), "lint", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["issues"] == [
        "legacy.legacy_fn: registered via callable; prefer Task subclass for extensibility"]


def test_plugins_lint_passes_for_task_subclasses_and_fails_on_a_broken_or_empty_hook(plugin_env):
    clean = producer(plugin_env(CLEAN), "lint")
    assert clean.returncode == 0 and "All plug-ins look good" in clean.stdout
    broken = producer(plugin_env("[tokiwa.tasks]\nbroken = demo_plugins:no_such_hook\n"
                                 "empty = demo_plugins:register_nothing\n"), "lint")
    assert broken.returncode == 1
    assert "broken: " in broken.stdout and "empty: no tasks registered" in broken.stdout


def test_plugin_tasks_run_in_a_flow(plugin_env):
    code = ("from orchestrator.pyoco import Engine, Flow\n"
            "from orchestrator.pyoco.discovery.loader import plugin_tasks\n"
            "from orchestrator.pyoco.dsl.syntax import TaskWrapper\n"
            "from orchestrator.pyoco.trace.console import SilentTraceBackend\n"
            "tasks = plugin_tasks()\n"
            "flow = Flow('plugged') >> TaskWrapper(tasks['vision']) >> TaskWrapper(tasks['resize'])\n"
            "print(Engine(SilentTraceBackend()).run(flow, {'image': 'dog.png'}).results)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=plugin_env(CLEAN), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'vision': 'bunny in dog.png', 'resize': 'resized'}"
