"""Load the user's app object from ``package.module:attribute`` (both CLIs use this)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from orchestrator.errors import ConfigError


def load_app(spec: str) -> Any:
    """Import ``module:attr`` (the current directory is importable). If the attribute is a
    callable that is not an Orchestrator, it is called with no arguments (an app factory)."""
    from orchestrator.app import Orchestrator

    if ":" not in spec:
        raise ConfigError(f"--app must look like 'package.module:app', got {spec!r}", field="app")
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for --app {spec}: {exc}", field="app") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError as exc:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}", field="app") from exc
    if not isinstance(obj, Orchestrator) and callable(obj):
        obj = obj()
    if not isinstance(obj, Orchestrator):
        raise ConfigError(f"{spec} is a {type(obj).__name__}, not an Orchestrator", field="app")
    return obj
