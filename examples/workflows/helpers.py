"""Python callables used by the `python` steps of the example workflows."""

from __future__ import annotations


def summarize(ctx, greeting: str, lines: int, token: str) -> dict:
    """A `python` step gets the node context first, then the step's rendered kwargs."""
    ctx.logger.info("summarizing with token %s", token)  # the token is shown as *** in run logs
    ctx.artifacts.store("summary.txt", f"{greeting}: {lines} lines\n".encode())
    return {"greeting": greeting, "lines": lines, "token_used": token}
