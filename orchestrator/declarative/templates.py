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

Commands: :func:`render_command` renders a shell step's ``command`` with every ``{{ }}``
output held apart from the template's own text, so a value is always exactly one word: it
is never split by ``shlex``, never parsed by ``/bin/sh`` and never rendered a second time
(see the section below).

Redaction: every occurrence of a secret's value is replaced by ``***`` in what people see:
strings found anywhere in a value (dict keys included), log records (:class:`RedactingFilter`)
and run records (:class:`EnvSecretsRedactor`, a workflow's ``redact``). The values steps pass
each other are never redacted. Empty secrets are ignored (they would match everywhere).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets as _secrets
import shlex
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, pass_context
from jinja2.exceptions import SecurityError
from jinja2.runtime import Undefined
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import missing

from orchestrator.errors import ConfigError, TemplateError

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
        # jinja2 only calls ``exc`` with the message, so a factory works where its stubs say a class
        super().__init__(hint, obj, name, lambda message: MissingNameError(label, message))  # type: ignore[arg-type]


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


def make_environment(**options: Any) -> SandboxedEnvironment:
    """The Jinja environment every tokiwa template uses (sandboxed, strict, no autoescape);
    ``options`` are further Environment arguments (``finalize`` ...)."""
    env = _DataEnvironment(undefined=_NamingUndefined, autoescape=False, keep_trailing_newline=True, **options)
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


def template_data(source: str) -> str | None:
    """The template's own text: what is outside ``{{ }}``, ``{% %}`` and ``{# #}`` (every
    branch of an ``if`` included); None when ``source`` does not parse."""
    try:
        _ENV.parse(source)  # the lexer alone lets an unclosed {{ through
        return "".join(value for _, kind, value in _ENV.lex(source) if kind == "data")
    except TemplateSyntaxError:
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


# --- commands ---------------------------------------------------------------------------------
#
# A command template is rendered with each ``{{ }}`` output replaced by a marker: NUL, a nonce
# drawn for this render, the value's index, NUL. Values never contain NUL (they are refused)
# and cannot guess the nonce, so the rendered text holds the template's own words and quotes
# plus markers, and the values sit apart. Splitting into argv (``shlex``) or handing the text
# to ``/bin/sh`` therefore only ever reads what the workflow's author wrote.

VALUE_ENV_PREFIX = "TOKIWA_VALUE_"  # environment names that carry values into `shell: true` commands
_SHORT = 60  # characters of a value quoted in an error message


class _Slots:
    """The values of one command render, in the order Jinja output them."""

    def __init__(self) -> None:
        self.nonce = _secrets.token_hex(8)
        self.pattern = re.compile(f"\x00{self.nonce}:(\\d+)\x00")
        self.values: list[str] = []

    def marker(self, value: Any) -> str:
        text = value if isinstance(value, str) else str(value)
        # a macro's or a `{% set %}` block's output already holds markers: the value is the text
        text = self.pattern.sub(lambda m: self.values[int(m.group(1))], text)
        self.values.append(text)
        return f"\x00{self.nonce}:{len(self.values) - 1}\x00"


_CURRENT_SLOTS: ContextVar[_Slots | None] = ContextVar("tokiwa_command_slots", default=None)


@pass_context  # evaluated at render time, constants included, so every output gets a marker
def _to_marker(context: Any, value: Any) -> Any:
    slots = _CURRENT_SLOTS.get()
    return value if slots is None else slots.marker(value)


_COMMAND_ENV = make_environment(finalize=_to_marker)


def _place(where: str | None) -> str:
    return f"{where}: " if where else ""


def _short(value: str) -> str:
    return repr(value if len(value) <= _SHORT else value[:_SHORT] + "…")


@dataclass(frozen=True)
class RenderedCommand:
    """A command template rendered with its values held apart (see :func:`render_command`).

    ``text`` is the rendered template with a marker where each ``{{ }}`` output was,
    ``values`` those outputs as text; :meth:`argv` and :meth:`shell` put them back safely.
    """

    source: str
    text: str
    values: tuple[str, ...]
    pattern: re.Pattern[str]
    where: str | None = None

    def fill(self, text: str) -> str:
        """``text`` with its markers replaced by their values."""
        return self.pattern.sub(lambda m: self.values[int(m.group(1))], text)

    @property
    def literal(self) -> str:
        """The rendered template without its values."""
        return self.pattern.sub("", self.text)

    def argv(self) -> list[str]:
        """The words of the template (split like a shell would, quotes honoured), each value
        inside the word it was written in: ``cat {{ x }}`` is two words whatever ``x`` holds,
        and an empty value is an empty argument."""
        try:
            words = shlex.split(self.text)
        except ValueError as exc:
            raise TemplateError(f"{_place(self.where)}command {self.source!r} cannot be split into words "
                                f"({exc}); check the quotes written in the template") from None
        if not words:
            raise TemplateError(f"{_place(self.where)}command {self.source!r} is empty once rendered")
        return [self.fill(word) for word in words]

    def shell(self) -> tuple[str, dict[str, str]]:
        """A ``/bin/sh`` script and the environment variables it reads its values from.

        Each value becomes a reference to a variable ``TOKIWA_VALUE_<n>``, quoted for where it
        stands: ``"${TOKIWA_VALUE_0}"`` in plain text, bare inside double quotes, closing and
        reopening single quotes around it. The shell expands a variable into one word and never
        parses its value as shell code, whatever quoting context the reference lands in.
        Refused (TemplateError): a value inside ``$(( ))`` (it would be evaluated as
        arithmetic), in a here-document whose delimiter is quoted (it would not be expanded),
        or as a here-document's delimiter.
        """
        return _ShellQuoter(self).run()


def render_command(source: str, namespace: Mapping[str, Any], *, where: str | None = None) -> RenderedCommand:
    """Render a command template, keeping each ``{{ }}`` output apart from the template's text.

    Control blocks (``{% if %}``, ``{% for %}``) work as usual and what they output of the
    template's own text is ordinary command text. A value holding a NUL byte (no command
    argument can) and a value changed after its output (a ``{% filter %}`` block around
    ``{{ }}``) are refused with a TemplateError naming ``where``.
    """
    place = _place(where)
    if "\x00" in source:
        raise TemplateError(f"{place}command template {source!r} contains a NUL byte")
    slots = _Slots()
    token = _CURRENT_SLOTS.set(slots)
    try:
        text = _COMMAND_ENV.from_string(source).render(dict(namespace))
    except (UndefinedError, TemplateSyntaxError, SecurityError, TypeError, ValueError) as exc:
        raise _error(exc, source, where, namespace) from exc
    finally:
        _CURRENT_SLOTS.reset(token)
    for value in slots.values:
        if "\x00" in value:
            raise TemplateError(f"{place}the value {_short(value)} contains a NUL byte, which no command "
                                "argument can hold")
    if "\x00" in slots.pattern.sub("", text):
        raise TemplateError(f"{place}command template {source!r}: a value was changed after it was output "
                            "(a {% filter %} block?); apply filters inside {{ }} instead")
    return RenderedCommand(source, text, tuple(slots.values), slots.pattern, where)


_BREAKS = frozenset(" \t\n;&|()<>")  # characters that end a word; after one, `#` starts a comment


@dataclass
class _Frame:
    kind: str  # top, subst ($( )), arith ($(( ))), backtick, double, single, param (${ }), comment, heredoc
    depth: int = 0  # open parentheses inside a subst / arith frame
    delimiter: str = ""  # heredoc
    strip_tabs: bool = False  # heredoc (<<-)
    quoted: bool = False  # heredoc with a quoted delimiter: no expansion in its body


class _ShellQuoter:
    """Reads a rendered command the way ``/bin/sh`` does (quotes, ``$( )``, backticks,
    ``${ }``, ``$(( ))``, comments, here-documents) to quote each value's reference for the
    context it stands in. Reading a context wrong only changes word splitting: a variable's
    value is never parsed as code."""

    def __init__(self, command: RenderedCommand) -> None:
        self.command, self.text = command, command.text
        self.i = 0
        self.out: list[str] = []
        self.stack = [_Frame("top")]
        self.pending: list[_Frame] = []  # here-documents whose body starts at the next newline
        self.word_start = True
        self.env: dict[str, str] = {}

    def run(self) -> tuple[str, dict[str, str]]:
        while self.i < len(self.text):
            frame = self.stack[-1]
            if frame.kind == "heredoc":
                self._heredoc_line(frame)
                continue
            marker = self.command.pattern.match(self.text, self.i)
            if marker:
                self.out.append(self._reference(int(marker.group(1))))
                self.i = marker.end()
                self.word_start = False
            else:
                self._HANDLERS[frame.kind](self, self.text[self.i])
        unclosed = next((f.kind for f in reversed(self.stack) if f.kind in ("single", "double")), None)
        if unclosed is not None:
            quote = "'" if unclosed == "single" else '"'
            raise self._refuse(f"the {quote} quote written in the template is never closed, so /bin/sh "
                               "could not run it; close it (a value inside {{ }} needs no quoting)")
        return "".join(self.out), self.env

    # -- output helpers
    def _copy(self, n: int = 1) -> None:
        self.out.append(self.text[self.i:self.i + n])
        self.i += n

    def _push(self, kind: str, n: int) -> None:
        self._copy(n)
        self.stack.append(_Frame(kind))

    def _pop(self, n: int = 1) -> None:
        self._copy(n)
        self.stack.pop()

    def _refuse(self, why: str) -> TemplateError:
        return TemplateError(f"{_place(self.command.where)}command {self.command.source!r}: {why}")

    def _reference(self, index: int) -> str:
        name = f"{VALUE_ENV_PREFIX}{index}"
        context = next(f for f in reversed(self.stack) if f.kind != "param")
        if context.kind == "arith":
            raise self._refuse("a {{ }} value inside $(( )) would be evaluated as arithmetic; "
                               "compute it in the template instead ({{ a + 1 }})")
        if context.kind == "heredoc" and context.quoted:
            raise self._refuse("a {{ }} value in a here-document with a quoted delimiter would not be "
                               "expanded; leave the delimiter unquoted")
        self.env[name] = self.command.values[index]
        ref = "${" + name + "}"
        if context.kind in ("double", "comment", "heredoc"):
            return ref
        if context.kind == "single":
            return f"'\"{ref}\"'"
        return f'"{ref}"'

    # -- contexts
    def _plain(self, char: str) -> None:
        """top, subst and backtick frames: unquoted shell text."""
        start = self.word_start
        self.word_start = char in _BREAKS  # a handler below may correct it
        if char == "#" and start:
            self._push("comment", 1)
        elif char == "<" and self.text.startswith("<<", self.i):
            self._heredoc_operator()
        elif char == "\n":
            self._copy()
            self.stack.extend(reversed(self.pending))
            self.pending = []
        elif char in "()":
            self._paren(char)
        elif char in self._COMMON:
            self._COMMON[char](self)
        else:
            self._copy()

    def _paren(self, char: str) -> None:
        frame = self.stack[-1]
        if frame.kind != "subst":
            self._copy()
        elif char == "(":
            frame.depth += 1
            self._copy()
        elif frame.depth:
            frame.depth -= 1
            self._copy()
        else:
            self._pop()
            self.word_start = False  # `$(x)#y` is one word, not a comment

    def _escape(self) -> None:
        at_marker = self.text.startswith("\x00", self.i + 1)
        self._copy(1 if at_marker else 2)

    def _dollar(self) -> None:
        if self.text.startswith("$((", self.i):
            self._push("arith", 3)
        elif self.text.startswith("$(", self.i):
            self._push("subst", 2)
            self.word_start = True
        elif self.text.startswith("${", self.i):
            self._push("param", 2)
        else:
            self._copy()

    def _backtick(self) -> None:
        if self.stack[-1].kind == "backtick":
            self._pop()
        else:
            self._push("backtick", 1)

    _COMMON: ClassVar[dict[str, Callable[[_ShellQuoter], None]]] = {"\\": _escape, "$": _dollar, "`": _backtick,
               "'": lambda self: self._push("single", 1), '"': lambda self: self._push("double", 1)}

    def _single(self, char: str) -> None:
        if char == "'":
            self._pop()
        else:
            self._copy()

    def _double(self, char: str) -> None:
        if char == '"':
            self._pop()
        elif char in "\\$`":
            self._COMMON[char](self)
        else:
            self._copy()

    def _param(self, char: str) -> None:
        if char == "}":
            self._pop()
        elif char in self._COMMON:
            self._COMMON[char](self)
        else:
            self._copy()

    def _arith(self, char: str) -> None:
        frame = self.stack[-1]
        if char == "(":
            frame.depth += 1
        elif char == ")" and frame.depth:
            frame.depth -= 1
        elif char == ")" and self.text.startswith("))", self.i):
            self._pop(2)
            return
        self._copy()

    def _comment(self, char: str) -> None:
        if char == "\n":
            self.stack.pop()  # the newline itself belongs to the text around the comment
        else:
            self._copy()

    _HANDLERS = {"top": _plain, "subst": _plain, "backtick": _plain, "single": _single, "double": _double,
                 "param": _param, "arith": _arith, "comment": _comment}

    # -- here-documents
    def _heredoc_operator(self) -> None:
        j = self.i + 2
        strip_tabs = self.text.startswith("-", j)
        j += strip_tabs
        while j < len(self.text) and self.text[j] in " \t":
            j += 1
        delimiter, quoted, end = self._word(j)
        if self.command.pattern.search(self.text, j, end):
            raise self._refuse("a here-document's delimiter cannot come from a {{ }} value")
        if delimiter:
            self.pending.append(_Frame("heredoc", delimiter=delimiter, strip_tabs=strip_tabs, quoted=quoted))
        self._copy(end - self.i)
        self.word_start = False

    def _word(self, j: int) -> tuple[str, bool, int]:
        """The word starting at ``j`` with its quotes removed, whether it had any, its end."""
        word, quoted = [], False
        while j < len(self.text) and self.text[j] not in _BREAKS:
            char = self.text[j]
            if char in "'\"":
                close = self.text.find(char, j + 1)
                close = len(self.text) if close < 0 else close
                word.append(self.text[j + 1:close])
                quoted, j = True, close + 1
            elif char == "\\":
                word.append(self.text[j + 1:j + 2])
                quoted, j = True, j + 2
            else:
                word.append(char)
                j += 1
        return "".join(word), quoted, min(j, len(self.text))

    def _heredoc_line(self, frame: _Frame) -> None:
        end = self.text.find("\n", self.i)
        end = len(self.text) if end < 0 else end + 1
        line = self.text[self.i:end]
        body = line.rstrip("\n")
        if (body.lstrip("\t") if frame.strip_tabs else body) == frame.delimiter:
            self.stack.pop()
        else:
            line = self.command.pattern.sub(lambda m: self._reference(int(m.group(1))), line)
        self.out.append(line)
        self.i = end


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


class EnvSecretsRedactor:
    """A :class:`Redactor` over the current values of the environment variables ``names`` (the
    ones that are set), read at each call: a declarative workflow's ``redact`` for its records,
    which are written while the workflow runs, with the secrets its steps read."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(names)
        self._cached: tuple[tuple[str, ...], Redactor] | None = None

    def redactor(self) -> Redactor:
        values = tuple(os.environ[name] for name in self.names if name in os.environ)
        if self._cached is None or self._cached[0] != values:
            self._cached = (values, Redactor(values))
        return self._cached[1]

    def __call__(self, value: Any) -> Any:
        return self.redactor()(value)


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
