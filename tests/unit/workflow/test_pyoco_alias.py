"""The one-line alias: `import pyoco` resolving to orchestrator.pyoco, module for module."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from unittest.mock import patch

import pytest

from orchestrator import errors
from orchestrator.pyoco import install_alias, remove_alias

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def alias():
    install_alias()
    yield
    remove_alias()


def test_pyoco_modules_are_the_compatible_modules(alias):
    import pyoco
    import pyoco.core.engine
    import pyoco.core.models
    from pyoco.dsl.syntax import TaskWrapper

    import orchestrator.pyoco
    import orchestrator.pyoco.core.engine
    import orchestrator.pyoco.dsl.syntax

    assert pyoco is orchestrator.pyoco
    assert pyoco.core.engine is orchestrator.pyoco.core.engine
    assert pyoco.core.models.Flow is orchestrator.pyoco.Flow
    assert TaskWrapper is orchestrator.pyoco.dsl.syntax.TaskWrapper


def test_patching_a_pyoco_name_patches_the_compatible_module(alias):
    import orchestrator.pyoco.discovery.loader as loader

    with patch("pyoco.discovery.loader.iter_entry_points", return_value=[]):
        assert loader.iter_entry_points() == []
    assert loader.iter_entry_points is not None


def test_modules_the_surface_does_not_have_are_not_found(alias):
    with pytest.raises(ModuleNotFoundError):
        import pyoco.server  # noqa: F401


def test_the_alias_refuses_when_the_real_pyoco_is_already_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyoco", types.ModuleType("pyoco"))
    with pytest.raises(errors.StateError, match="already imported"):
        install_alias()


def test_one_import_line_is_enough_in_a_fresh_interpreter():
    code = ("import orchestrator.pyoco.alias\n"
            "from pyoco import task\nfrom pyoco.core.models import Flow\nfrom pyoco.core.engine import Engine\n"
            "@task\ndef hi(ctx):\n    return 'hi'\n"
            "print(Engine().run(Flow('x') >> hi).results)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "{'hi': 'hi'}"


def test_importing_the_package_does_not_install_the_alias():
    code = "import orchestrator.pyoco, sys\nimport importlib.util\nprint(importlib.util.find_spec('pyoco'))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"
