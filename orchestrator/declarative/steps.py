"""Step types of declarative workflows: shell, file, test, docker, python, and custom ones.

A step type is a function ``run(step, params)`` (sync or async) plus an optional pydantic
model of its params. ``step`` is a :class:`StepContext`; ``params`` are the step's params
after template rendering (and validation by the model, when there is one). The return value
is the step's output (``steps.<id>.output`` for later steps). Params named in the type's
``raw_params`` reach it unrendered, for the type to render itself: the shell type renders
``command`` with :func:`~orchestrator.declarative.templates.render_command`, which keeps each value one
word.

Paths a step takes from its params go through :meth:`StepContext.path`, which keeps them
inside the workflow's folder (``base_dir``) unless the step has ``allow_outside``.

Custom types: ``register_step_type("slack", fn, params_model=SlackParams)`` in code, or an
entry point in the ``tokiwa.steps`` group (name -> a callable, a class whose instances are
callable or have ``run``, or a :class:`StepType`), loaded the first time an unknown type is
looked up. A built-in type cannot be silently replaced (``replace=True`` to override).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import shlex
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from orchestrator.callbacks import call_maybe_async, is_async_callable
from orchestrator.declarative.templates import (
    VALUE_ENV_PREFIX,
    Redactor,
    evaluate,
    render_command,
    render_text,
    template_data,
)
from orchestrator.errors import (
    CheckFailedError,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    StepExecutionError,
    UnsafePathError,
)
from orchestrator.workflow.execs import exec_command_async, exec_shell_async
from orchestrator.workflow.threads import run_in_thread

ENTRY_POINT_GROUP = "tokiwa.steps"
logger = logging.getLogger("tokiwa.steps")
# characters that only mean something to a shell, written outside quotes (inside "..." only the
# expansions $ ` \ do); a `command` holding one needs `shell: true`. `?` is not among them: it is a
# glob only where nothing matches it less often than it is part of a URL, and without a shell it
# is passed as it is.
_SHELL_SYNTAX = set("|&;<>()$`\\*[]{}~\n")
_DOUBLE_QUOTED_SYNTAX = set("$`\\")


def shell_syntax(literal: str) -> tuple[set[str], str | None]:
    """The shell syntax in a command template's own text (see ``_SHELL_SYNTAX``), read with
    its quotes, and the quote left open at its end (None if every quote is closed)."""
    found: set[str] = set()
    quote: str | None = None
    for char in literal:
        if quote == "'":
            quote = None if char == "'" else quote
        elif quote == '"':
            if char == '"':
                quote = None
            elif char in _DOUBLE_QUOTED_SYNTAX:
                found.add(char)
        elif char in "'\"":
            quote = char
        elif char in _SHELL_SYNTAX:
            found.add(char)
    return found, quote


@dataclass
class StepContext:
    """What a step type gets besides its params.

    ``node`` is the runner's NodeContext (input, context, artifacts, signal, logger ...),
    ``namespace`` the template namespace (variables, input, context, steps, secrets, run),
    ``base_dir`` the folder relative paths are resolved against (the workflow file's folder)
    and that :meth:`path` keeps paths inside unless ``allow_outside`` is true.
    """

    node: Any
    step_id: str
    base_dir: Path
    namespace: dict[str, Any]
    secrets: dict[str, str] = field(default_factory=dict)
    redactor: Redactor = field(default_factory=Redactor)
    allow_outside: bool = False

    def log(self, message: str) -> None:
        """Log a line to the run (secrets redacted)."""
        self.node.logger.info("%s", self.redactor.text(message))

    def __post_init__(self) -> None:
        if self.redactor and not isinstance(self.node, RedactingNodeContext):
            self.node = RedactingNodeContext(self.node, self.redactor)

    def path(self, value: str | os.PathLike[str], *, field: str | None = None) -> Path:
        """``value`` as an absolute path, ``~`` expanded, relative ones under ``base_dir``.

        Unless ``allow_outside`` is true, the path must lead inside ``base_dir`` once ``..``
        and symlinks are resolved (a symlink in the folder that points out of it is refused
        too); UnsafePathError otherwise, naming the step, the path, ``field`` (the param it
        came from) and the opt-out, before anything touches the file system. The path
        returned has its folders resolved but keeps a final symlink, so deleting it removes
        the link rather than its target.
        """
        text = os.fspath(value)
        label = f"step {self.step_id!r}: path {text!r}" + (f" ({field})" if field else "")
        if "\x00" in text:
            raise UnsafePathError(f"{label} contains a NUL byte", path=text, base_dir=str(self.base_dir),
                                  node=self.step_id)
        try:
            root = self.base_dir.resolve()
            candidate = Path(os.path.expanduser(text))  # like a shell: an unknown ~user stays as written
            full = candidate if candidate.is_absolute() else root / candidate
            resolved, folder = full.resolve(), full.parent.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise UnsafePathError(f"{label} cannot be resolved: {exc}", path=text, base_dir=str(self.base_dir),
                                  node=self.step_id) from exc
        if not self.allow_outside and resolved != root and not resolved.is_relative_to(root):
            raise UnsafePathError(
                f"{label} leads to {resolved}, outside the workflow folder {root}; set allow_outside: true "
                "on the step (or on the workflow) to allow paths outside it",
                path=text, base_dir=str(root), resolved=str(resolved), node=self.step_id)
        return resolved if full.name in ("", "..") else folder / full.name


class _RedactingLogger(logging.LoggerAdapter[logging.Logger]):
    """Wraps a node's logger so that every line is redacted before it is recorded."""

    def __init__(self, inner: Any, redactor: Redactor) -> None:
        super().__init__(inner, {})
        self.redactor = redactor

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        text = str(msg) % args if args else str(msg)
        self.logger.log(level, "%s", self.redactor.text(text), **kwargs)


class RedactingNodeContext:
    """A NodeContext seen through a redactor: its ``logger`` hides secrets; all else is the same."""

    def __init__(self, inner: Any, redactor: Redactor) -> None:
        self._inner = inner
        self.logger = _RedactingLogger(inner.logger, redactor) if redactor else inner.logger

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass(frozen=True)
class StepType:
    name: str
    run: Callable[[StepContext, dict[str, Any]], Any]
    params_model: type[BaseModel] | None = None
    builtin: bool = False
    raw_params: frozenset[str] = frozenset()  # params the type renders itself (left unrendered)

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Params checked (and defaults filled) by the model; raises pydantic's ValidationError."""
        if self.params_model is None:
            return dict(params)
        return self.params_model.model_validate(params).model_dump()


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


Scalar = str | int | float | bool


# --- shell ------------------------------------------------------------------------------------
class ShellParams(_Params):
    argv: list[Scalar] | None = None
    shell: bool = False  # before `command`: its validator reads it
    command: str | None = None  # a template, rendered by run_shell (see render_command)
    cwd: str | None = None
    env: dict[str, Scalar] = Field(default_factory=dict)
    timeout_s: float | None = Field(default=None, gt=0)
    ok_exit_codes: list[int] = Field(default_factory=lambda: [0], min_length=1)
    input: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ShellParams:
        if (self.argv is None) == (self.command is None):
            raise ValueError("give exactly one of argv (a list) or command (a string)")
        if self.argv is not None and not self.argv:
            raise ValueError("argv must not be empty")
        if self.shell and self.command is None:
            raise ValueError("shell: true needs command (a string), not argv")
        reserved = sorted(name for name in self.env if name.startswith(VALUE_ENV_PREFIX))
        if reserved:
            raise ValueError(f"env names starting with {VALUE_ENV_PREFIX} are reserved for the values of "
                             f"a shell command; rename {', '.join(reserved)}")
        return self

    @field_validator("command")
    @classmethod
    def _no_shell_syntax(cls, command: str | None, info: ValidationInfo) -> str | None:
        # only the template's own text counts: a value inside {{ }} is always one argument
        if command is None or info.data.get("shell", True):
            return command
        found, unclosed = shell_syntax(template_data(command) or "")
        if unclosed:
            other = '"' if unclosed == "'" else "'"
            raise ValueError(f"command has an unclosed {unclosed} quote in its own text (outside {{{{ }}}}); "
                             f"close it, or write the {unclosed} inside {other}...{other}")
        if found:
            raise ValueError(f"command uses shell syntax ({', '.join(map(repr, sorted(found)))}); set shell: true "
                             "or give argv as a list")
        return command


async def run_shell(step: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    """Run ``argv`` (each item one argument), or render ``command`` with render_command: split
    into words (each value inside one word), or, with ``shell: true``, a script whose values
    come from ``TOKIWA_VALUE_<n>`` environment variables."""
    p = ShellParams.model_validate(params)
    cwd = str(step.path(p.cwd, field="params.cwd")) if p.cwd else str(step.base_dir)
    env = {k: _text(v) for k, v in p.env.items()}
    common: dict[str, Any] = {"cwd": cwd, "timeout": p.timeout_s, "ok_codes": p.ok_exit_codes, "input": p.input}
    where = f"step {step.step_id} params.command"
    if p.shell:
        script, values = render_command(p.command or "", step.namespace, where=where).shell()
        shown = "".join(f"\n  {name}={shlex.quote(value)}" for name, value in values.items())
        step.log(f"shell: {script}{shown}")
        result = await exec_shell_async(script, allow_shell=True, env={**env, **values}, **common)
    else:
        argv = ([_text(a) for a in p.argv] if p.argv is not None
                else render_command(p.command or "", step.namespace, where=where).argv())
        step.log(f"exec: {shlex.join(argv)}")
        result = await exec_command_async(argv, env=env, **common)
    return result.to_dict()


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- file -------------------------------------------------------------------------------------
class FileParams(_Params):
    op: Literal["write", "copy", "delete", "render"]
    path: str | None = None
    src: str | None = None
    dest: str | None = None
    content: str | None = None
    template: str | None = None
    append: bool = False
    missing_ok: bool = True

    @model_validator(mode="after")
    def _fields_for_op(self) -> FileParams:
        needs = {"write": ("path", "content"), "copy": ("src", "dest"), "delete": ("path",),
                 "render": ("template", "dest")}[self.op]
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"op {self.op!r} needs {', '.join(missing)}")
        return self


async def run_file(step: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    p = FileParams.model_validate(params)
    return await asyncio.to_thread(_file_op, step, p)


def _file_op(step: StepContext, p: FileParams) -> dict[str, Any]:
    # every path is checked (StepContext.path) before the first one is used
    if p.op == "write":
        target = step.path(p.path or "", field="params.path")
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a" if p.append else "w", encoding="utf-8") as handle:
            handle.write(p.content or "")
        return {"op": "write", "path": str(target), "bytes": len((p.content or "").encode())}
    if p.op == "copy":
        src, dest = step.path(p.src or "", field="params.src"), step.path(p.dest or "", field="params.dest")
        if not src.is_file():
            raise StepExecutionError(f"step {step.step_id!r}: cannot copy {src}: no such file", node=step.step_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return {"op": "copy", "src": str(src), "dest": str(dest), "bytes": dest.stat().st_size}
    if p.op == "delete":
        target = step.path(p.path or "", field="params.path")
        existed = target.exists()
        if not existed and not p.missing_ok:
            raise StepExecutionError(f"step {step.step_id!r}: cannot delete {target}: no such file",
                                     node=step.step_id)
        target.unlink(missing_ok=True)
        return {"op": "delete", "path": str(target), "existed": existed}
    source = step.path(p.template or "", field="params.template")
    dest = step.path(p.dest or "", field="params.dest")
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise StepExecutionError(f"step {step.step_id!r}: template {source} not found", node=step.step_id) from exc
    rendered = render_text(text, step.namespace, where=f"step {step.step_id} template {source.name}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(rendered, encoding="utf-8")
    return {"op": "render", "template": str(source), "dest": str(dest), "bytes": len(rendered.encode())}


# --- test -------------------------------------------------------------------------------------
class TestParams(_Params):
    __test__ = False  # not a pytest test class
    expression: str = Field(min_length=1)
    message: str | None = None


async def run_test(step: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    p = TestParams.model_validate(params)
    value = evaluate(p.expression, step.namespace, where=f"step {step.step_id} expression")
    if not value:
        shown = step.redactor.text(repr(value))
        detail = f": {p.message}" if p.message else ""
        raise CheckFailedError(
            f"step {step.step_id!r}: check failed{detail} ({p.expression} evaluated to {shown})",
            expression=p.expression, value=step.redactor(value), node=step.step_id)
    return {"expression": p.expression, "passed": True}


# --- docker -----------------------------------------------------------------------------------
class DockerParams(_Params):
    image: str = Field(min_length=1)
    args: list[Scalar] = Field(default_factory=list)
    env: dict[str, Scalar] = Field(default_factory=dict)
    volumes: list[str] = Field(default_factory=list)
    workdir: str | None = None
    entrypoint: str | None = None
    network: str | None = None
    user: str | None = None
    remove: bool = True
    timeout_s: float | None = Field(default=None, gt=0)
    ok_exit_codes: list[int] = Field(default_factory=lambda: [0], min_length=1)


def build_docker_argv(params: dict[str, Any], base_dir: Path | str = ".") -> list[str]:
    """The ``docker run`` argv for docker step params.

    Env values are not put on the command line (where ``ps`` would show them): each variable
    is passed as ``-e NAME`` and its value through docker's own environment. A relative host
    path in a volume (``./data:/data``) is resolved against ``base_dir``.
    """
    p = DockerParams.model_validate(params)
    argv = ["docker", "run"]
    if p.remove:
        argv.append("--rm")
    for name in p.env:
        argv += ["-e", name]
    for volume in p.volumes:
        argv += ["-v", _volume(volume, Path(base_dir))]
    for flag, value in (("-w", p.workdir), ("--entrypoint", p.entrypoint), ("--network", p.network),
                        ("--user", p.user)):
        if value is not None:
            argv += [flag, value]
    return [*argv, p.image, *(_text(a) for a in p.args)]


def _host_path(host: str) -> bool:
    """Whether a volume's host part is a path (``./data``, ``/srv``, ``~/x``), not a named volume."""
    return host.startswith((".", "~")) or "/" in host


def _volume(spec: str, base_dir: Path) -> str:
    host, sep, rest = spec.partition(":")
    if not sep or not host or not rest:
        raise InvalidArgumentError(f"volume {spec!r} must be HOST:CONTAINER[:MODE]")
    if _host_path(host):
        path = Path(os.path.expanduser(host))
        host = str(path if path.is_absolute() else (base_dir / path).resolve())
    return f"{host}:{rest}"


async def _docker_available(step: StepContext) -> None:
    if shutil.which("docker") is None:
        raise StepExecutionError(
            f"step {step.step_id!r}: docker is not available: no `docker` executable on PATH",
            node=step.step_id)
    try:
        await exec_command_async(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=15)
    except StepExecutionError as exc:
        reason = (getattr(exc, "stderr", "") or str(exc)).strip().splitlines()[-1:] or ["no answer"]
        raise StepExecutionError(
            f"step {step.step_id!r}: docker is not available: the engine does not answer ({reason[0]})",
            node=step.step_id) from exc


async def run_docker(step: StepContext, params: dict[str, Any]) -> dict[str, Any]:
    p = DockerParams.model_validate(params)
    for i, volume in enumerate(p.volumes):
        host = volume.partition(":")[0]
        if _host_path(host):
            step.path(host, field=f"params.volumes[{i}]")
    argv = build_docker_argv(params, step.base_dir)
    await _docker_available(step)
    step.log(f"docker: {shlex.join(argv)}")
    result = await exec_command_async(argv, env={k: _text(v) for k, v in p.env.items()},
                                      timeout=p.timeout_s, ok_codes=p.ok_exit_codes)
    return {**result.to_dict(), "argv": argv}


# --- python -----------------------------------------------------------------------------------
class PythonParams(_Params):
    # "package.module:attr" or "path/to/file.py:attr" (relative to the workflow file)
    callable: str = Field(pattern=r"^([A-Za-z_][\w.]*|[^:]+\.py):[A-Za-z_][\w.]*$")
    kwargs: dict[str, Any] = Field(default_factory=dict)


_FILE_MODULES: dict[Path, Any] = {}


def import_callable(ref: str, base_dir: Path | str = ".") -> Callable[..., Any]:
    """``"package.module:attr.sub"`` or ``"helpers.py:fn"`` -> the object; NotFoundError
    saying what is missing. A ``.py`` path is loaded from ``base_dir`` (once per file)."""
    module_name, _, attr_path = ref.partition(":")
    target: Any = _load_file_module(Path(base_dir) / module_name) if module_name.endswith(".py") else None
    if target is None:
        try:
            target = importlib.import_module(module_name)
        except ImportError as exc:
            raise NotFoundError(f"cannot import module {module_name!r} (for {ref!r}): {exc}") from exc
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise NotFoundError(f"{ref!r}: {module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, part)
    if not callable(target):
        raise NotFoundError(f"{ref!r} is not callable")
    fn: Callable[..., Any] = target
    return fn


def _load_file_module(path: Path) -> Any:
    path = path.resolve()
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    if not path.is_file():
        raise NotFoundError(f"python file {path} not found")
    spec = importlib.util.spec_from_file_location(f"tokiwa_step_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise NotFoundError(f"cannot load python file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _FILE_MODULES[path] = module
    return module


async def run_python(step: StepContext, params: dict[str, Any]) -> Any:
    """Call ``callable(ctx, **kwargs)`` with the runner's NodeContext; sync ones in a thread."""
    p = PythonParams.model_validate(params)
    module = p.callable.partition(":")[0]
    if module.endswith(".py"):
        step.path(module, field="params.callable")
    try:
        fn = await asyncio.to_thread(import_callable, p.callable, step.base_dir)
    except NotFoundError as exc:
        raise StepExecutionError(f"step {step.step_id!r}: {exc}", node=step.step_id) from exc
    if is_async_callable(fn):
        return await call_maybe_async(fn, step.node, **p.kwargs)
    return await run_in_thread(fn, step.node, **p.kwargs)  # interrupted when the step is cancelled


# --- registry ---------------------------------------------------------------------------------
_REGISTRY: dict[str, StepType] = {
    name: StepType(name, fn, model, builtin=True, raw_params=frozenset(raw))
    for name, fn, model, raw in (("shell", run_shell, ShellParams, ["command"]), ("file", run_file, FileParams, []),
                                 ("test", run_test, TestParams, []), ("docker", run_docker, DockerParams, []),
                                 ("python", run_python, PythonParams, []))
}
_entry_points_loaded = False


def register_step_type(name: str, fn: Any, *, params_model: type[BaseModel] | None = None,
                       replace: bool = False, raw_params: Iterable[str] = ()) -> StepType:
    """Register a custom step type ``name`` -> ``fn(step, params)`` (sync or async).

    ``raw_params`` names params passed unrendered (the type renders them itself, e.g. with
    :func:`~orchestrator.declarative.templates.render_command`)."""
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        raise InvalidArgumentError(f"step type name must be a non-blank word, got {name!r}")
    step_type = _as_step_type(name, fn, params_model)
    if raw_params:
        step_type = StepType(name, step_type.run, step_type.params_model, raw_params=frozenset(raw_params))
    existing = _REGISTRY.get(name)
    if existing is not None and not replace:
        raise ConflictError(f"step type {name!r} is already registered; pass replace=True to override it")
    _REGISTRY[name] = step_type
    return step_type


def unregister_step_type(name: str) -> bool:
    """Remove a custom step type (built-ins stay); True if it was registered."""
    existing = _REGISTRY.get(name)
    if existing is None or existing.builtin:
        return False
    del _REGISTRY[name]
    return True


def _as_step_type(name: str, obj: Any, params_model: type[BaseModel] | None) -> StepType:
    if isinstance(obj, StepType):
        return StepType(name, obj.run, params_model or obj.params_model, raw_params=obj.raw_params)
    if inspect.isclass(obj):
        params_model = params_model or getattr(obj, "params_model", None)
        obj = obj()
    run = getattr(obj, "run", None) if not inspect.isfunction(obj) else None
    run = run if callable(run) else obj
    if not callable(run):
        raise InvalidArgumentError(f"step type {name!r} must be callable or have a run method, got {obj!r}")
    if params_model is not None and not (inspect.isclass(params_model) and issubclass(params_model, BaseModel)):
        raise InvalidArgumentError(f"step type {name!r}: params_model must be a pydantic model class")
    return StepType(name, run, params_model or getattr(obj, "params_model", None))


def load_entry_points(force: bool = False) -> list[str]:
    """Register the step types of the ``tokiwa.steps`` entry points; returns their names.

    A plug-in that fails to load is logged and skipped (one broken package must not stop
    every workflow); one that clashes with a registered name is skipped with a warning.
    """
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return []
    _entry_points_loaded = True
    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            logger.warning("step type %r from %s ignored: the name is taken", ep.name, ep.value)
            continue
        try:
            register_step_type(ep.name, ep.load())
        except Exception:  # noqa: BLE001 - a broken plug-in is reported, not fatal
            logger.warning("step type plug-in %r (%s) failed to load", ep.name, ep.value, exc_info=True)
            continue
        loaded.append(ep.name)
    return loaded


def get_step_type(name: str) -> StepType:
    """The registered step type ``name`` (entry points are loaded on the first miss)."""
    found = _REGISTRY.get(name)
    if found is None:
        load_entry_points()
        found = _REGISTRY.get(name)
    if found is None:
        raise NotFoundError(f"unknown step type {name!r}; known: {', '.join(step_types())}")
    return found


def step_types() -> list[str]:
    """Names of every registered step type, sorted."""
    return sorted(_REGISTRY)
