"""Jinja2 templates for workflow parameters, and secret redaction.

Parameters of declarative steps are templates over a namespace such as
``{"variables": ..., "input": ..., "context": ..., "steps": {id: {"output": ...}}, "secrets": ...}``.

Choices (the port plan is silent on them):

* StrictUndefined: a missing name is a :class:`~orchestrator.errors.TemplateError` that
  names it (``name``) and lists what was available, never an empty string.
* Sandboxed: templates come from workflow files, so they run in Jinja's
  ``SandboxedEnvironment`` (no access to ``__class__``, ``mro`` ...). No HTML autoescape.
* A string that is exactly one expression, nothing around it (not even spaces),
  ``"{{ steps.fetch.output }}"``, renders to the
  expression's native value (a list stays a list, a number a number); any other string
  renders to a string. This lets a step pass structured data to the next one.
* ``a.b`` on a mapping means the key ``b`` first (then the attribute), so step ids such
  as ``copy`` or ``items`` work as ``steps.copy.output``.
* Only values are rendered, recursively through dicts and lists; keys are kept as written.

Redaction: every occurrence of a secret's value is replaced by ``***`` in strings found
anywhere in a value (dict keys included), in log records (:class:`RedactingFilter`) and in
run records. Empty secrets are ignored (they would match everywhere).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError
from jinja2.runtime import Undefined
from jinja2.sandbox import SandboxedEnvironment, SecurityError
from jinja2.utils import missing

from .errors import ConfigError, TemplateError

REDACTED = "***"
_WHOLE_EXPRESSION = re.compile(r"^\{\{(?P<expr>(?:(?!\{\{|\}\}).)*)\}\}\Z", re.DOTALL)


class MissingNameError(UndefinedError):
    """An UndefinedError that remembers which name was missing."""

    def __init__(self, name: str | None, message: str) -> None:
        super().__init__(message)
        self.name = name


class _NamingUndefined(StrictUndefined):
    """StrictUndefined whose error carries the missing name and says where it was looked up."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        name, owner = self._undefined_name, self._undefined_obj
        if self._undefined_hint:
            return self._undefined_hint
        if isinstance(owner, Mapping):
            return f"{name!r} is undefined (available keys: {', '.join(map(str, owner)) or 'none'})"
        if owner is not None and not isinstance(owner, Undefined) and owner is not missing:
            return f"{type(owner).__name__} value has no attribute or key {name!r}"
        return f"{name!r} is undefined"

    def __init__(self, hint: str | None = None, obj: Any = missing, name: str | None = None, exc: Any = None):
        label = None if name is None else str(name)
        super().__init__(hint, obj, name, lambda message: MissingNameError(label, message))


class _DataEnvironment(SandboxedEnvironment):
    """``a.b`` on a mapping looks up the key ``b`` before the attribute, so a step called
    ``copy`` or ``items`` is reachable as ``steps.copy`` (plain Jinja would find dict.copy)."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                pass
        return super().getattr(obj, attribute)


def make_environment() -> SandboxedEnvironment:
    """The Jinja environment every tokiwa template uses (sandboxed, strict, no autoescape)."""
    env = _DataEnvironment(undefined=_NamingUndefined, autoescape=False, keep_trailing_newline=True)
    env.filters["tojson"] = _tojson
    return env


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False, default=repr)


_ENV = make_environment()


def _error(exc: Exception, source: str, where: str | None, names: Iterable[str] = ()) -> TemplateError:
    place = f"{where}: " if where else ""
    if isinstance(exc, MissingNameError):
        top = ""
        if exc.name is not None and exc.message == f"{exc.name!r} is undefined":
            top = f" (top-level names: {', '.join(sorted(names)) or 'none'})"
        return TemplateError(f"{place}template {source!r}: {exc.message}{top}", name=exc.name)
    if isinstance(exc, TemplateSyntaxError):
        return TemplateError(f"{place}template {source!r} has a syntax error on line {exc.lineno}: {exc.message}")
    if isinstance(exc, SecurityError):
        return TemplateError(f"{place}template {source!r} is not allowed: {exc}")
    return TemplateError(f"{place}template {source!r} failed: {type(exc).__name__}: {exc}")


def render_string(source: str, namespace: Mapping[str, Any], *, where: str | None = None) -> Any:
    """Render one template string; a lone ``{{ expr }}`` returns the expression's value.

    ``where`` (e.g. ``"step build, params.argv[1]"``) prefixes error messages.
    """
    whole = _WHOLE_EXPRESSION.match(source)
    try:
        if whole:
            return _evaluate(whole.group("expr"), namespace)
        if "{{" not in source and "{%" not in source and "{#" not in source:
            return source
        return _ENV.from_string(source).render(dict(namespace))
    except (UndefinedError, TemplateSyntaxError, SecurityError, TypeError, ValueError) as exc:
        raise _error(exc, source, where, namespace) from exc


def render_text(source: str, namespace: Mapping[str, Any], *, where: str | None = None) -> str:
    """Render a whole template (e.g. a file's contents) to text, never to a native value."""
    try:
        return _ENV.from_string(source).render(dict(namespace))
    except (UndefinedError, TemplateSyntaxError, SecurityError, TypeError, ValueError) as exc:
        raise _error(exc, source if len(source) <= 200 else source[:200] + "…", where, namespace) from exc


def syntax_problem(source: str, *, expression: bool = False) -> str | None:
    """Why ``source`` (a template, or a bare expression) does not parse; None if it does.

    Used to reject a workflow file at load time rather than when the step runs.
    """
    try:
        if expression:
            _ENV.compile_expression(source)
        else:
            _ENV.parse(source)
    except TemplateSyntaxError as exc:
        return f"template syntax error: {exc.message}"
    return None


def _evaluate(expression: str, namespace: Mapping[str, Any]) -> Any:
    value = _ENV.compile_expression(expression, undefined_to_none=False)(**namespace)
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    return value


def evaluate(expression: str, namespace: Mapping[str, Any], *, where: str | None = None) -> Any:
    """Evaluate a bare Jinja expression (no ``{{ }}``), e.g. ``steps.a.output.count > 2``.

    This is how ``test`` steps check conditions: safely, without Python's ``eval``.
    """
    if not isinstance(expression, str) or not expression.strip():
        raise TemplateError(f"{where + ': ' if where else ''}an expression must be a non-empty string")
    try:
        return _evaluate(expression, namespace)
    except (UndefinedError, TemplateSyntaxError, SecurityError, TypeError, ValueError) as exc:
        raise _error(exc, expression, where, namespace) from exc


def render(value: Any, namespace: Mapping[str, Any], *, where: str | None = None) -> Any:
    """Render every string inside ``value`` (dicts and lists recursively); keys are kept."""
    if isinstance(value, str):
        return render_string(value, namespace, where=where)
    if isinstance(value, Mapping):
        return {k: render(v, namespace, where=_join(where, str(k))) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [render(v, namespace, where=f"{where or ''}[{i}]") for i, v in enumerate(value)]
    return value


def _join(where: str | None, key: str) -> str:
    return f"{where}.{key}" if where else key


# --- secrets ----------------------------------------------------------------------------------


def secrets_from_env(names: Iterable[str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Read the named secrets from the environment; a missing one is a ConfigError naming it."""
    env = os.environ if env is None else env
    names = list(names)
    missing = [name for name in names if name not in env]
    if missing:
        raise ConfigError(
            f"secret environment variable(s) not set: {', '.join(missing)}", field="secrets"
        )
    return {name: env[name] for name in names}


class Redactor:
    """Replaces every secret value with ``***`` in strings, containers and exceptions' text."""

    def __init__(self, secrets: Iterable[str] | Mapping[str, str] = ()) -> None:
        values = secrets.values() if isinstance(secrets, Mapping) else secrets
        # longest first, so a secret that contains another is hidden whole
        unique = sorted({str(v) for v in values if v}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, unique))) if unique else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text) if self._pattern else text

    def __call__(self, value: Any) -> Any:
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self(k): self(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        return value


def redact(value: Any, secrets: Iterable[str] | Mapping[str, str]) -> Any:
    """``value`` with every secret replaced by ``***`` (a new object; the input is not changed)."""
    return Redactor(secrets)(value)


class RedactingFilter(logging.Filter):
    """A logging filter that hides secrets in a record's message and arguments.

    Attach it to the handlers (or loggers) that may see step output:
    ``handler.addFilter(RedactingFilter(secrets))``.
    """

    def __init__(self, secrets: Iterable[str] | Mapping[str, str]) -> None:
        super().__init__()
        self.redactor = Redactor(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redactor:
            record.msg = self.redactor.text(record.getMessage())
            record.args = None
        return True
