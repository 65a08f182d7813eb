"""``tokiwa-producer cancel RUN_ID``: cancel a run wherever it runs.

The command writes the cancel request (:func:`orchestrator.runs.cancel.cancel_run`) and the
workers do the rest: the one running the run stops it within a moment, and one about to start
it records it ``cancelled`` instead. It runs nothing itself, so it cannot cancel anything
locally. Exit codes: 0 when the request was written, 1 when the run had already finished,
2 for a bad run id or no Redis URL, 69 / 75 / 77 when Redis is unreachable / refuses for now /
refuses the credentials (``orchestrator.cli.exitcodes``).
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
from dataclasses import dataclass
from typing import Any

import click
from redis.exceptions import RedisError

from orchestrator.cli import exitcodes
from orchestrator.cli.inspect import _open, json_option
from orchestrator.cli.producer import build_app, common_options, report_redis_error, run_async, setup_logging
from orchestrator.errors import InvalidArgumentError
from orchestrator.keys import Keys
from orchestrator.runs.cancel import cancel_run
from orchestrator.runs.stores import RunStore


@dataclass(frozen=True)
class _Host:
    """What ``cancel_run`` needs, without an app connection (which would create the stream and
    group) and without a runner (this process runs nothing)."""

    redis: Any
    keys: Keys
    run_store: RunStore
    runner: None = None


def default_by() -> str:
    """``user@host`` of whoever runs the command."""
    host = socket.gethostname()
    try:
        return f"{getpass.getuser()}@{host}"
    except Exception:  # no user name in the environment or the password database
        return host


_STATES = {
    "cancelling": "it is running: it stops within a moment",
    "queued": "it has not started: it will be recorded cancelled instead",
    "unknown": "no record of it yet: the worker that runs or starts it cancels it",
}


def render(answer: dict[str, Any]) -> str:
    """One line for a person."""
    run_id = answer["run_id"]
    if not answer["cancelled"]:
        return f"run {run_id} already finished ({answer['status']}): nothing to cancel"
    state = _STATES.get(answer["status"], answer["status"])
    return f"run {run_id}: cancel requested by {answer['by']} ({state})"


@click.command("cancel")
@click.argument("run_id")
@click.option("--by", default=None, help="Who cancels, recorded with the run (default: user@host).")
@click.option("--reason", default=None, help="Why, recorded with the run.")
@json_option
@common_options
def cancel_command(run_id: str, by: str | None, reason: str | None, as_json: bool, app_spec: str | None,
                   **settings: Any) -> None:
    """Cancel RUN_ID wherever it runs: a running run stops, a queued one never starts."""
    setup_logging(settings.pop("log_level", None) or "WARNING")
    app = build_app(app_spec, mode="producer", **settings)
    if app.settings.redis_url is None:
        click.echo("error: cancel needs the cluster's Redis (--redis-url or TOKIWA_REDIS_URL); without one "
                   "it would start a Redis of its own that no worker reads", err=True)
        sys.exit(exitcodes.USAGE)

    async def go() -> int:
        inspector, close = await _open(app)
        try:
            host = _Host(inspector.redis, inspector.keys, inspector.run_store)
            answer = await cancel_run(host, run_id, by=by or default_by(), reason=reason)
        except RedisError as exc:
            return report_redis_error(exc)
        except InvalidArgumentError as exc:
            click.echo(f"error: {exc}", err=True)
            return exitcodes.USAGE
        finally:
            await close()
        click.echo(json.dumps(answer, default=str, ensure_ascii=False) if as_json else render(answer))
        return exitcodes.OK if answer["cancelled"] else exitcodes.FAILURE

    sys.exit(run_async(go()))
