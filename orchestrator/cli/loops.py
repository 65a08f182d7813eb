"""Which event loop the CLIs run on: ``auto`` (uvloop when it is installed, else asyncio's),
``asyncio`` or ``uvloop``; ``tokiwa-worker run --loop`` or ``TOKIWA_LOOP``.

uvloop (``pip install 'tokiwa[uvloop]'``) makes every socket read and write, timer and task
switch cheaper; docs/performance.md has what it changes on the perf suite. ``auto`` is the
default, so an installed uvloop is used without a flag; ``asyncio`` keeps the standard loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from importlib.util import find_spec
from typing import Any

from orchestrator.errors import ConfigError

LOOPS = ("auto", "asyncio", "uvloop")
LOOP_ENV = "TOKIWA_LOOP"

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


def uvloop_installed() -> bool:
    return find_spec("uvloop") is not None


def resolve_loop(choice: str | None = None) -> str:
    """``asyncio`` or ``uvloop`` for ``choice`` (None: ``$TOKIWA_LOOP``, else ``auto``).
    ConfigError for an unknown name, or for ``uvloop`` when it is not installed."""
    name = (choice if choice is not None else os.environ.get(LOOP_ENV) or "auto").strip().lower()
    if name not in LOOPS:
        raise ConfigError(f"unknown event loop {name!r}: choose one of {', '.join(LOOPS)} "
                          f"(--loop / {LOOP_ENV})", field="loop")
    if name == "auto":
        return "uvloop" if uvloop_installed() else "asyncio"
    if name == "uvloop" and not uvloop_installed():
        raise ConfigError("--loop uvloop needs uvloop: pip install 'tokiwa[uvloop]' (or use --loop auto)",
                          field="loop")
    return name


def loop_runner(choice: str | None = None) -> Runner:
    """``asyncio.run`` or ``uvloop.run`` as :func:`resolve_loop` says."""
    if resolve_loop(choice) == "uvloop":
        import uvloop

        runner: Runner = uvloop.run
        return runner
    return asyncio.run
