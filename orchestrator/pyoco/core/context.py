"""pyoco's :class:`Context`: what every task of a run shares, and what ``Engine.run`` returns.

``params`` (the run parameters), ``results`` (task **name** -> its return value), ``scratch``
(free), ``artifacts`` (name -> ``{path, type}``), ``env``, ``artifact_dir`` (default
``./artifacts``), loop frames (``loop`` / ``loops``) and variables (``get_var`` / ``set_var``).
A Context can be built on its own, e.g. in a test: ``Context(params={"x": 1}).resolve(...)``.

:meth:`Context.resolve` turns an ``inputs`` value into what the task receives:

* ``$node.<Task>.output`` (then ``.key`` steps into dicts, list indices or attributes): that
  task's result; a task without a result is a KeyError;
* ``$ctx.params.<key>``: a run parameter (the rest of the text is the key); KeyError if absent;
* ``$env.<NAME>``: ``ctx.env`` first, then the process environment; KeyError if absent;
* ``$ctx.scratch.<path>`` and ``$ctx.results.<Task>[.<path>]`` (pyoco's tutorial forms,
  which pyoco 0.5.1 passed through unresolved); KeyError if absent;
* anything else, ``$``-strings included, is returned unchanged.

The artifact directory is created when the first artifact is saved (pyoco created
``./artifacts`` whenever a Context was built, in every working directory).
"""

from __future__ import annotations

import os
import pathlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.pyoco.core.models import RunContext, RunStatus

DEFAULT_ARTIFACT_DIR = "./artifacts"


@dataclass
class LoopFrame:
    """One level of the loops running now: ``ctx.loop`` is the innermost."""

    name: str
    type: str
    index: int | None = None
    iteration: int | None = None
    count: int | None = None
    item: Any = None
    condition: bool | None = None
    path: str | None = None


class LoopStack:
    """The loop frames, outermost first; each frame's ``path`` is like ``outer[0].inner[3]``."""

    def __init__(self) -> None:
        self._frames: list[LoopFrame] = []

    def push(self, frame: LoopFrame) -> LoopFrame:
        segment = frame.name if frame.index is None else f"{frame.name}[{frame.index}]"
        parent = self._frames[-1].path if self._frames else ""
        frame.path = f"{parent}.{segment}" if parent else segment
        self._frames.append(frame)
        return frame

    def pop(self) -> LoopFrame:
        if not self._frames:
            raise RuntimeError("Loop stack underflow: pop_loop() without a matching push_loop()")
        return self._frames.pop()

    @property
    def current(self) -> LoopFrame | None:
        return self._frames[-1] if self._frames else None

    def snapshot(self) -> Sequence[LoopFrame]:
        return tuple(self._frames)


def _step(value: Any, key: str) -> Any:
    if isinstance(value, Mapping):
        return value[key]
    if isinstance(value, (list, tuple)) and key.lstrip("-").isdigit():
        return value[int(key)]
    return getattr(value, key)


@dataclass
class Context:
    """The run's shared state (see the module doc)."""

    params: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    artifact_dir: str | None = None
    _vars: dict[str, Any] = field(default_factory=dict, repr=False)
    run_context: RunContext | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _loop_stack: LoopStack = field(default_factory=LoopStack, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.artifact_dir is None:
            self.artifact_dir = DEFAULT_ARTIFACT_DIR

    @property
    def is_cancelled(self) -> bool:
        """True once the run is being cancelled (``Engine.cancel``, Ctrl+C): stop early."""
        run = self.run_context
        return run is not None and run.status in (RunStatus.CANCELLING, RunStatus.CANCELLED)

    # -- loops and variables
    @property
    def loop(self) -> LoopFrame | None:
        return self._loop_stack.current

    @property
    def loops(self) -> Sequence[LoopFrame]:
        return self._loop_stack.snapshot()

    def push_loop(self, frame: LoopFrame) -> LoopFrame:
        return self._loop_stack.push(frame)

    def pop_loop(self) -> LoopFrame:
        return self._loop_stack.pop()

    def set_var(self, name: str, value: Any) -> None:
        self._vars[name] = value

    def get_var(self, name: str, default: Any = None) -> Any:
        return self._vars.get(name, default)

    def clear_var(self, name: str) -> None:
        self._vars.pop(name, None)

    # -- results and artifacts
    def get_result(self, node_name: str) -> Any:
        with self._lock:
            return self.results.get(node_name)

    def set_result(self, node_name: str, value: Any) -> None:
        with self._lock:
            self.results[node_name] = value

    def save_artifact(self, name: str, data: Any) -> str:
        """Write ``data`` to ``artifact_dir/name`` (text, bytes in binary, anything else as
        ``str(data)``; sub-folders are created), record ``artifacts[name] = {path, type}``
        (type ``object`` for a dict or list) and return the absolute path."""
        if not isinstance(name, str) or not name.strip():
            from orchestrator.errors import InvalidArgumentError

            raise InvalidArgumentError(f"artifact name must be a non-blank string, got {name!r}")
        path = pathlib.Path(self.artifact_dir or DEFAULT_ARTIFACT_DIR) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data if isinstance(data, str) else str(data), encoding="utf-8")
        where = str(path.absolute())
        kind = "object" if isinstance(data, (dict, list)) else type(data).__name__
        with self._lock:
            self.artifacts[name] = {"path": where, "type": kind}
        return where

    # -- references
    def resolve(self, value: Any) -> Any:
        """What an ``inputs`` value stands for (see the module doc)."""
        if not isinstance(value, str) or not value.startswith("$"):
            return value
        if value.startswith("$node."):
            parts = value.split(".")
            if len(parts) < 3 or parts[2] != "output":
                return value
            if parts[1] not in self.results:
                raise KeyError(f"Node '{parts[1]}' result not found in context.")
            return self._walk(self.results[parts[1]], parts[3:])
        if value.startswith("$ctx.params."):
            key = value[len("$ctx.params."):]
            if key not in self.params:
                raise KeyError(f"Param '{key}' not found in context.")
            return self.params[key]
        if value.startswith("$env."):
            key = value[len("$env."):]
            if key in self.env:
                return self.env[key]
            if key in os.environ:
                return os.environ[key]
            raise KeyError(f"Environment variable '{key}' not found.")
        for root in ("scratch", "results"):
            prefix = f"$ctx.{root}."
            if value.startswith(prefix):
                parts = value[len(prefix):].split(".")
                try:
                    return self._walk(getattr(self, root), parts)
                except (KeyError, IndexError, AttributeError):
                    raise KeyError(f"'{value}' not found in context.") from None
        return value

    @staticmethod
    def _walk(value: Any, parts: Sequence[str]) -> Any:
        for part in parts:
            value = _step(value, part)
        return value

    # -- expression data
    def expression_data(self) -> dict[str, Any]:
        """What ``$ctx.…`` reads in loop and switch expressions (variables, loop aliases too)."""
        data: dict[str, Any] = dict(self._vars)
        data.update(params=self.params, results=self.results, scratch=self.scratch, artifacts=self.artifacts,
                    loop=self.loop, loops=list(self.loops))
        return data

    def env_data(self) -> dict[str, str]:
        """What ``$env.…`` reads: the process environment, overridden by ``ctx.env``."""
        return {**os.environ, **self.env}
