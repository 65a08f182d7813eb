"""The expression language of loops and ``switch``: ``$ctx.<path>``, ``$env.<NAME>``,
literals, arithmetic, comparisons, ``and`` / ``or`` / ``not`` and ``in``.

``$ctx.metrics.acc > 0.9 and $env.MODE == 'prod'`` reads ``metrics`` then ``acc`` from the
context data (dict keys, else attributes) and ``MODE`` from the environment. Nothing else can
be named or called: no builtins, no attributes of values, no function calls, so an expression
in a flow file cannot run code. Tuple and list literals (``$ctx.x in ('a', 'b')``) are
allowed too. A syntax problem is an :class:`ExpressionSyntaxError` when the expression is
built; a missing path is an :class:`ExpressionEvaluationError` when it is evaluated.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import InvalidArgumentError, WorkflowError

_REF = re.compile(r"\$(ctx|env)\.([A-Za-z_][\w.]*)")
_PATH = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")
_ROOTS = {"ctx": "_ctx", "env": "_env"}
_ALLOWED = (
    ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.And, ast.Or, ast.Not,
    ast.Eq, ast.NotEq, ast.Gt, ast.GtE, ast.Lt, ast.LtE, ast.In, ast.NotIn,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Mod, ast.Pow, ast.USub, ast.UAdd,
    ast.Constant, ast.Name, ast.Load, ast.Call, ast.Tuple, ast.List,
)


class ExpressionSyntaxError(InvalidArgumentError):
    """Raised when an expression cannot be built: bad syntax, or a name or call it may not use."""


class ExpressionEvaluationError(WorkflowError, RuntimeError):
    """Raised when an expression fails while evaluated (a missing ``$ctx`` path, a type error)."""


def translate(expr: str) -> str:
    """The Python text of ``expr``: ``$ctx.a.b`` becomes ``_ctx('a.b')``, ``$env.X`` ``_env('X')``."""
    if re.search(r"\b_(ctx|env)\b", _REF.sub(" ", expr)):
        raise ExpressionSyntaxError(f"expression {expr!r}: write $ctx.<path> / $env.<NAME>, not _ctx / _env")
    text = _REF.sub(lambda m: f"{_ROOTS[m.group(1)]}({m.group(2)!r})", expr.strip())
    if "$" in text:
        raise ExpressionSyntaxError(f"expression {expr!r}: only $ctx.<path> and $env.<NAME> references are allowed")
    return text


def _check(tree: ast.AST, source: str) -> None:
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ExpressionSyntaxError(f"expression {source!r}: {type(node).__name__} is not allowed")
        if isinstance(node, ast.Name) and node.id not in _ROOTS.values():
            raise ExpressionSyntaxError(f"expression {source!r}: unknown name {node.id!r} (use $ctx.{node.id}?)")
        if isinstance(node, ast.Call) and (
                not isinstance(node.func, ast.Name) or node.keywords or len(node.args) != 1
                or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, str)):
            raise ExpressionSyntaxError(f"expression {source!r}: calls are not allowed")


def compile_safely(python_expr: str, source: str | None = None) -> Any:
    """Compile translated text after checking every syntax node against the allowed set."""
    shown = python_expr if source is None else source
    try:
        tree = ast.parse(python_expr, mode="eval")
    except SyntaxError as exc:
        raise ExpressionSyntaxError(f"expression {shown!r}: {exc.msg}") from None
    _check(tree, shown)
    return compile(tree, "<expression>", "eval")


def resolve_path(data: Any, path: str, root: str) -> Any:
    """Follow ``a.b.c`` through dict keys (else attributes) of ``data``."""
    if not _PATH.match(path):
        raise ExpressionEvaluationError(f"{root}.{path}: not a valid path")
    current = data
    for part in path.split("."):
        if isinstance(current, Mapping):
            if part not in current:
                raise ExpressionEvaluationError(f"{root}.{path} not found (no {part!r})")
            current = current[part]
        elif hasattr(current, part) and not part.startswith("_"):
            current = getattr(current, part)
        else:
            raise ExpressionEvaluationError(f"{root}.{path} not found (no {part!r})")
    return current


@dataclass(frozen=True)
class Expression:
    """A checked, compiled expression; ``source`` is the text it was built from."""

    source: str
    _python: str = field(init=False, repr=False, compare=False)
    _code: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise TypeError(f"an expression is a string, got {type(self.source).__name__}")
        python = translate(self.source)
        object.__setattr__(self, "_python", python)
        object.__setattr__(self, "_code", compile_safely(python, self.source))

    def evaluate(self, ctx: Mapping[str, Any] | None = None, env: Mapping[str, Any] | None = None,
                 extras: Mapping[str, Any] | None = None) -> Any:
        """The value, with ``$ctx`` read from ``ctx`` and ``$env`` from ``env``."""
        ctx_data, env_data = ctx or {}, env or {}
        scope: dict[str, Any] = {"_ctx": lambda p: resolve_path(ctx_data, p, "$ctx"),
                                 "_env": lambda p: resolve_path(env_data, p, "$env")}
        scope.update(extras or {})
        try:
            return eval(self._code, {"__builtins__": {}}, scope)  # noqa: S307 - checked by _check
        except Exception as exc:  # noqa: BLE001 - reported with the expression's text
            raise ExpressionEvaluationError(f"Failed to evaluate expression {self.source!r}: {exc}") from exc


def ensure_expression(value: str | Expression) -> Expression:
    """``value`` as an Expression (a string is stripped and compiled)."""
    if isinstance(value, Expression):
        return value
    if isinstance(value, str):
        return Expression(value.strip())
    raise ExpressionSyntaxError(f"expected an expression string, got {value!r}")


__all__ = ["Expression", "ExpressionEvaluationError", "ExpressionSyntaxError", "ensure_expression"]
