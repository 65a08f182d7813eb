"""Load the user's app object from ``package.module:attribute`` (both CLIs use this).

Every way this can fail is a :class:`~orchestrator.errors.ConfigError` with ``field="app"``
(the CLIs print it as one line and exit 2): a malformed spec, a module that cannot be
imported (missing, or failing at import: its error and file:line are named), a missing
attribute, a factory that fails, an object that is not an Orchestrator.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any

from orchestrator.errors import ConfigError


def _where(exc: BaseException) -> str:
    """`` (file:line)`` of the innermost frame of ``exc`` (the user's code that raised)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({exc.filename}:{exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


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
    except ConfigError:
        raise  # the app's own settings are invalid: that error names the field
    except Exception as exc:  # the module failed while it was imported: a bug or a bad setting in it
        text = exc.msg if isinstance(exc, SyntaxError) else (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"importing {module_name!r} for --app {spec} failed: {type(exc).__name__}: "
                          f"{text}{_where(exc)}", field="app") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError as exc:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (--app {spec})", field="app") from exc
    if not isinstance(obj, Orchestrator) and callable(obj):
        try:
            obj = obj()
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"the app factory {spec}() failed: {type(exc).__name__}: {exc}{_where(exc)}",
                              field="app") from exc
    if not isinstance(obj, Orchestrator):
        raise ConfigError(f"{spec} is a {type(obj).__name__}, not an Orchestrator", field="app")
    return obj
