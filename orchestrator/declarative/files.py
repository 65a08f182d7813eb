"""Declarative workflows: a YAML / TOML / JSON file of steps becomes a :class:`Workflow`.

```yaml
name: build-and-check
variables: {greeting: hello}
secrets: [API_TOKEN]            # read from the environment, shown as *** in logs and records
max_parallel: 2
steps:
  - id: say
    type: shell
    params: {argv: [echo, "{{ variables.greeting }} {{ input.who }}"]}
  - id: check
    type: test
    depends_on: [say]
    params: {expression: "'hello' in steps.say.output.stdout"}
```

Each step becomes a :class:`~orchestrator.workflow.model.Node` named after its id, whose handler
renders the step's params (Jinja2, see :mod:`orchestrator.declarative.templates`) and runs its step type
(:mod:`orchestrator.declarative.steps`); the :class:`~orchestrator.workflow.runner.Runner` does scheduling,
retries and timeouts. Errors in a file name the field and, for YAML and JSON, the line.
"""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, NoReturn

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator import errors
from orchestrator.callbacks import call_maybe_async
from orchestrator.config import default_state_dir
from orchestrator.declarative.steps import StepContext, get_step_type
from orchestrator.declarative.templates import (
    EnvSecretsRedactor,
    Redactor,
    evaluate,
    render,
    secrets_from_env,
    syntax_problem,
)
from orchestrator.errors import CyclicDependencyError, NotFoundError, StepExecutionError, WorkflowFileError
from orchestrator.runs.stores import RunStore
from orchestrator.workflow.artifacts import FileArtifactStore
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.result import WorkflowRunResult
from orchestrator.workflow.retry import RetryPolicy
from orchestrator.workflow.runner import Runner

_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,99}$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrySpec(_Spec):
    """A step's ``retry`` block; maps onto :class:`~orchestrator.workflow.retry.RetryPolicy`."""

    max_attempts: int = Field(default=1, ge=1)
    backoff: Literal["fixed", "exponential", "linear"] = "exponential"
    initial_delay_s: float = Field(default=1.0, ge=0)
    max_delay_s: float = Field(default=30.0, ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    increment_s: float | None = Field(default=None, ge=0)
    jitter: Literal["none", "full", "equal"] = "none"
    # exception class names (any class in the error's MRO matches); None = every error
    retryable_errors: list[str] | None = None

    def to_policy(self) -> RetryPolicy:
        retry_on: tuple[Any, ...] = (Exception,) if self.retryable_errors is None else tuple(self.retryable_errors)
        return RetryPolicy(max_attempts=self.max_attempts, backoff=self.backoff,
                           initial_delay_s=self.initial_delay_s, multiplier=self.multiplier,
                           max_delay_s=self.max_delay_s, increment_s=self.increment_s,
                           jitter=self.jitter, retry_on=retry_on)


class StepSpec(_Spec):
    """One step. ``id`` (or ``name``) names it: later steps read ``steps.<id>.output``."""

    id: str | None = Field(default=None, pattern=_ID_PATTERN)
    name: str | None = Field(default=None, pattern=_ID_PATTERN)
    type: str = Field(min_length=1)
    description: str | None = None
    depends_on: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    retry: RetrySpec | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    when: str | None = None
    # paths outside the workflow's folder: None = the workflow's allow_outside. A plain boolean,
    # never a template, so no input value can turn the check off.
    allow_outside: StrictBool | None = None

    @model_validator(mode="after")
    def _has_id(self) -> StepSpec:
        if self.id is None and self.name is None:
            raise ValueError("a step needs an id (or name)")
        if self.id is not None and self.name is not None and self.id != self.name:
            raise ValueError(f"id {self.id!r} and name {self.name!r} differ; give one of them")
        return self

    @property
    def step_id(self) -> str:
        return self.id or self.name or ""


class WorkflowSpec(_Spec):
    """A whole declarative file."""

    name: str = Field(min_length=1)
    type: Literal["workflow", "chatflow"] = "workflow"
    description: str | None = None
    variables: dict[str, Any] = Field(default_factory=dict)
    secrets: list[str] = Field(default_factory=list)
    max_parallel: int | None = Field(default=None, ge=1)
    timeout_s: float | None = Field(default=None, gt=0)
    fail_fast: bool = True
    checkpoint: StrictBool = True  # a worker's run resumes after its completed steps when redelivered
    artifacts_dir: str | None = None
    allow_outside: StrictBool = False  # the default of every step's allow_outside
    steps: list[StepSpec] = Field(min_length=1)

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, names: list[str]) -> list[str]:
        bad = [s for s in names if not re.match(_ENV_NAME, s)]
        if bad:
            raise ValueError(f"secrets must be environment variable names, got {bad}")
        return names


class DeclarativeWorkflow(Workflow):
    """A Workflow built from a file; ``spec`` is the validated file and ``run_options`` the
    Runner options it asks for (``concurrency``, ``fail_fast``, ``timeout``). The file's
    ``max_parallel``, ``timeout_s``, ``fail_fast`` and ``checkpoint`` are the workflow's own,
    so every run applies them: ``run_workflow_file``, ``Runner.run`` and the runs of an app
    that registers it alike. Its records show the secrets' values as ``***``."""

    def __init__(self, spec: WorkflowSpec, nodes: list[Node], *, base_dir: Path, source: str | None) -> None:
        super().__init__(spec.name, nodes, type=spec.type, description=spec.description,
                         max_parallel=spec.max_parallel, timeout_s=spec.timeout_s, fail_fast=spec.fail_fast,
                         checkpoint=spec.checkpoint)
        self.spec = spec
        self.base_dir = base_dir
        self.source = source
        if spec.secrets:
            self.redact = EnvSecretsRedactor(spec.secrets)

    @property
    def run_options(self) -> dict[str, Any]:
        return {"concurrency": self.spec.max_parallel, "fail_fast": self.spec.fail_fast,
                "timeout": self.spec.timeout_s}


# --- step handler ------------------------------------------------------------------------------


class StepHandler:
    """The node handler of one step: render params, run the step type. Its output is what later
    steps read, so it keeps the secrets' values: what people see of it (logs, run records) is
    redacted there (``DeclarativeWorkflow.redact``). Errors are redacted in place: they only
    ever reach people."""

    def __init__(self, step: StepSpec, spec: WorkflowSpec, base_dir: Path) -> None:
        self.step, self.spec, self.base_dir = step, spec, base_dir
        self.step_ids = [s.step_id for s in spec.steps]

    async def __call__(self, ctx: Any) -> Any:
        redactor = Redactor()
        try:
            secrets = secrets_from_env(self.spec.secrets)
            redactor = Redactor(secrets)
            return await self._run(ctx, secrets, redactor)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _scrub(exc, redactor)
            raise

    def namespace(self, ctx: Any, secrets: dict[str, str]) -> dict[str, Any]:
        steps = {sid: {"output": ctx.get_result(sid)} for sid in self.step_ids if ctx.has_result(sid)}
        return {"variables": self.spec.variables, "input": {} if ctx.input is None else ctx.input,
                "context": {} if ctx.context is None else ctx.context, "steps": steps, "secrets": secrets,
                "run": {"id": ctx.run_id, "workflow": self.spec.name, "workflow_id": ctx.workflow_id,
                        "attempt": ctx.attempt}}

    async def _run(self, ctx: Any, secrets: dict[str, str], redactor: Redactor) -> Any:
        sid = self.step.step_id
        namespace = self.namespace(ctx, secrets)
        if self.step.when is not None and not evaluate(self.step.when, namespace, where=f"step {sid} when"):
            ctx.logger.info("skipped: `when` is false (%s)", self.step.when)
            return None
        step_type = get_step_type(self.step.type)
        raw = {k: v for k, v in self.step.params.items() if k in step_type.raw_params}
        rest = {k: v for k, v in self.step.params.items() if k not in raw}
        params = {**render(rest, namespace, where=f"step {sid} params"), **raw}
        try:
            params = step_type.validate(params)
        except ValidationError as exc:
            problems = "; ".join(f"{_dotted(('params', *e['loc']))}: {e['msg']}" for e in exc.errors())
            raise StepExecutionError(f"step {sid!r}: invalid params after rendering: {problems}",
                                     node=sid) from None
        allow_outside = self.spec.allow_outside if self.step.allow_outside is None else self.step.allow_outside
        step = StepContext(node=ctx, step_id=sid, base_dir=self.base_dir, namespace=namespace,
                           secrets=secrets, redactor=redactor, allow_outside=allow_outside)
        return await call_maybe_async(step_type.run, step, params)


_SCRUBBED_ATTRS = ("stdout", "stderr", "argv", "value", "path", "resolved")


def _scrub(exc: BaseException, redactor: Redactor) -> None:
    """Redact secrets from an exception chain in place (message args and known attributes)."""
    if not redactor:
        return
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            current.args = tuple(redactor(a) for a in current.args)
            for attr in _SCRUBBED_ATTRS:
                if hasattr(current, attr):
                    setattr(current, attr, redactor(getattr(current, attr)))
        except (AttributeError, TypeError):
            pass
        current = current.__cause__ or current.__context__


# --- loading -----------------------------------------------------------------------------------


def load_workflow_file(path: str | Path) -> DeclarativeWorkflow:
    """Read, validate and build the workflow in ``path`` (``.yaml``/``.yml``, ``.toml``, ``.json``).

    Any problem is one :class:`~orchestrator.errors.WorkflowFileError` listing every bad
    field with its line (YAML, JSON).
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkflowFileError(f"workflow file not found: {file}", path=str(file)) from None
    data, lines = _parse(text, file)
    return _build(data, base_dir=file.resolve().parent, source=str(file), lines=lines)


def load_workflow_spec(data: dict[str, Any], *, base_dir: str | Path | None = None,
                       source: str | None = None) -> DeclarativeWorkflow:
    """Build a workflow from already-parsed data (relative paths resolve against ``base_dir``,
    default the current directory)."""
    return _build(data, base_dir=Path(base_dir or ".").resolve(), source=source, lines={})


def _parse(text: str, file: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    suffix = file.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text), _yaml_lines(text, file)
        if suffix == ".json":
            return json.loads(text), _yaml_lines(text, file, strict=False)
        if suffix == ".toml":
            return tomllib.loads(text), {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise WorkflowFileError(f"{file}: line {line}: not valid YAML: {getattr(exc, 'problem', exc)}",
                                path=str(file), line=line) from None
    except json.JSONDecodeError as exc:
        raise WorkflowFileError(f"{file}: line {exc.lineno}: not valid JSON: {exc.msg}",
                                path=str(file), line=exc.lineno) from None
    except tomllib.TOMLDecodeError as exc:
        raise WorkflowFileError(f"{file}: not valid TOML: {exc}", path=str(file)) from None
    raise WorkflowFileError(f"{file}: unknown workflow file type {suffix!r}; use .yaml, .yml, .toml or .json",
                            path=str(file))


def _yaml_lines(text: str, file: Path, strict: bool = True) -> dict[tuple[Any, ...], int]:
    """Map each path in the document (("steps", 1, "type")) to its 1-based line; duplicate
    mapping keys (which YAML would silently overwrite) are errors."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        if strict:
            raise
        return {}
    lines: dict[tuple[Any, ...], int] = {}
    stack: list[tuple[tuple[Any, ...], Any]] = [((), root)] if root is not None else []
    visited: set[int] = set()  # aliases share nodes: visit each once (recursive aliases exist)
    while stack:
        path, node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        lines.setdefault(path, node.start_mark.line + 1)  # a key's line beats its value's
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key, value in node.value:
                if key.value in seen:
                    raise WorkflowFileError(
                        f"{file}: line {key.start_mark.line + 1}: {_dotted((*path, key.value))}: duplicate key",
                        path=str(file), field=_dotted((*path, key.value)), line=key.start_mark.line + 1)
                seen.add(key.value)
                lines[(*path, key.value)] = key.start_mark.line + 1
                stack.append(((*path, key.value), value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(((*path, i), item) for i, item in enumerate(node.value))
    return lines


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


def _existing(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """The longest prefix of ``loc`` that exists in ``data`` (drops pydantic's union tags)."""
    kept: list[Any] = []
    for part in loc:
        if isinstance(data, dict):
            if part not in data:  # a missing field: name it, stop there
                kept.append(part)
                break
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            break
        kept.append(part)
    return tuple(kept)


def _line_of(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _fail(problems: list[tuple[tuple[Any, ...], str]], data: Any, lines: dict[tuple[Any, ...], int], source: str | None) -> NoReturn:
    rows = []
    for loc, message in problems:
        where = _existing(loc, data)
        rows.append((_dotted(where), _line_of(where, lines) if lines else None, message))
    detail = "\n".join(f"  {'line ' + str(ln) + ': ' if ln else ''}{field}: {msg}" for field, ln, msg in rows)
    first_field, first_line, _ = rows[0]
    raise WorkflowFileError(f"invalid workflow file {source or '(data)'}:\n{detail}", path=source,
                            field=first_field, line=first_line, problems=rows)


def _build(data: Any, *, base_dir: Path, source: str | None, lines: dict[tuple[Any, ...], int]) -> DeclarativeWorkflow:
    if not isinstance(data, dict):
        _fail([((), f"the top level must be a mapping, got {type(data).__name__}")], data, lines, source)
    try:
        spec = WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        _fail([(tuple(e["loc"]), e["msg"]) for e in exc.errors()], data, lines, source)
    problems = _check_steps(spec)
    if problems:
        _fail(problems, data, lines, source)
    nodes = [Node(s.step_id, StepHandler(s, spec, base_dir), depends_on=list(s.depends_on),
                  retry=s.retry.to_policy() if s.retry else None, timeout=s.timeout_s,
                  description=s.description) for s in spec.steps]
    try:
        return DeclarativeWorkflow(spec, nodes, base_dir=base_dir, source=source)
    except CyclicDependencyError as exc:
        index = [s.step_id for s in spec.steps].index(exc.nodes[0]) if exc.nodes else 0
        _fail([(("steps", index, "depends_on"), str(exc))], data, lines, source)
        raise  # unreachable: _fail raises


def _check_steps(spec: WorkflowSpec) -> list[tuple[tuple[Any, ...], str]]:
    """Checks that need the whole file: unique ids, known dependencies and types, params."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    ids = [s.step_id for s in spec.steps]
    for i, step in enumerate(spec.steps):
        id_field = "id" if step.id is not None else "name"
        if ids.index(step.step_id) != i:
            problems.append((("steps", i, id_field), f"duplicate step id {step.step_id!r}"))
        for j, dep in enumerate(step.depends_on):
            if dep not in ids:
                problems.append((("steps", i, "depends_on", j), f"unknown step {dep!r}; steps are {ids}"))
        if step.when is not None and (why := syntax_problem(step.when, expression=True)):
            problems.append((("steps", i, "when"), why))
        try:
            step_type = get_step_type(step.type)
        except NotFoundError as exc:
            problems.append((("steps", i, "type"), str(exc)))
            continue
        problems.extend((("steps", i, "params", *loc), msg) for loc, msg in _check_params(step_type, step.params))
    return problems


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _templates_in(value: Any, loc: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], str]]:
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _templates_in(v, (*loc, k))]
    if isinstance(value, list):
        return [x for i, v in enumerate(value) for x in _templates_in(v, (*loc, i))]
    return [(loc, value)] if _is_template(value) else []


def _check_params(step_type: Any, params: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Load-time params check: template syntax, then the type's model. Errors caused by a
    value that is still a template are left for run time, when it has been rendered; a raw
    param (one the type renders itself) is checked as written, which is what it gets."""
    templates = _templates_in(params)
    problems = [(loc, why) for loc, source in templates if (why := syntax_problem(source))]
    if step_type.params_model is None:
        return problems
    try:
        step_type.params_model.model_validate(params)
    except ValidationError as exc:
        for e in exc.errors():
            loc = tuple(e["loc"])
            raw = bool(loc) and loc[0] in step_type.raw_params
            if not raw and (_is_template(e.get("input")) or (not loc and templates)):
                continue
            problems.append((loc, e["msg"]))
    return problems


# --- running -----------------------------------------------------------------------------------


async def run_workflow_file(path: str | Path, input: Any = None, *, context: Any = None,  # noqa: A002
                            conversation_id: str | None = None, artifacts_dir: str | Path | None = None,
                            runner: Runner | None = None, store: RunStore | None = None) -> WorkflowRunResult:
    """Load ``path`` and run it here with the Runner (no Redis); return the run's result.

    Secrets must be set in the environment (checked before anything runs). Artifacts go to
    ``artifacts_dir`` > the file's ``artifacts_dir`` (relative to the file) >
    ``<state dir>/artifacts``, under a folder per run id. A workflow timeout returns the
    partial result (status ``failed``) instead of raising. With ``store``, the run record
    and its log lines are saved there.
    """
    workflow = load_workflow_file(path)
    secrets_from_env(workflow.spec.secrets)
    run_id = str(uuid.uuid4())
    root = Path(artifacts_dir) if artifacts_dir is not None else (
        workflow.base_dir / workflow.spec.artifacts_dir if workflow.spec.artifacts_dir
        else default_state_dir() / "artifacts")
    services = SimpleNamespace(artifacts=FileArtifactStore(root).scoped(run_id))
    result: WorkflowRunResult | None
    try:  # the workflow's max_parallel, timeout_s and fail_fast are its run defaults
        result = await (runner or Runner()).run(
            workflow, input=input, context=context, conversation_id=conversation_id, run_id=run_id,
            services=services)
    except errors.TimeoutError as exc:
        result = getattr(exc, "result", None)
        if result is None:
            raise
    if store is not None:
        await store.save(result.to_record())
        await store.append_logs(result.run_id, result.log_lines())
    return result
