"""``tokiwa-producer``: publish events, run the producer (cron under leader election).

Thin: parse, set up logging, load ``--app``, call one library function, return a named
exit code. Settings precedence: flags > ``TOKIWA_*`` env > ``--config`` TOML > the app's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from redis.exceptions import RedisError

from orchestrator import faults
from orchestrator.app import Orchestrator
from orchestrator.cli import exitcodes
from orchestrator.cli.lazy import LazyGroup
from orchestrator.cli.loader import load_app
from orchestrator.errors import ConfigError, NotFoundError, TokiwaError
from orchestrator.runs.registry import RunTimeoutError

F = TypeVar("F", bound=Callable[..., Any])

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | None) -> None:
    logging.basicConfig(level=(level or "INFO").upper(), format=LOG_FORMAT, stream=sys.stderr)


def common_options(func: F) -> F:
    """Options every command shares."""
    options = [
        click.option("--app", "app_spec", default=None, envvar="TOKIWA_APP",
                     help="Your app object, as package.module:app."),
        click.option("--redis-url", default=None, help="Redis URL (default: TOKIWA_REDIS_URL, else embedded)."),
        click.option("--namespace", default=None, help="Key prefix (default tokiwa)."),
        click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
                     help="TOML settings file (also TOKIWA_CONFIG)."),
        click.option("--log-level", default=None, help="DEBUG, INFO, WARNING ..."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_app(app_spec: str | None, *, mode: str, **settings: Any) -> Orchestrator:
    """Load ``--app`` (or a bare Orchestrator) and apply CLI settings over it."""
    config_file = settings.pop("config_file", None)
    previous = os.environ.get("TOKIWA_CONFIG")
    try:
        if config_file:  # an app module may build its Orchestrator at import time
            os.environ["TOKIWA_CONFIG"] = str(config_file)
        app: Orchestrator = load_app(app_spec) if app_spec else Orchestrator()
        app.mode = mode  # type: ignore[assignment]
        app.configure(config_file=config_file, **settings)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exitcodes.USAGE)
    finally:
        if config_file:
            if previous is None:
                os.environ.pop("TOKIWA_CONFIG", None)
            else:
                os.environ["TOKIWA_CONFIG"] = previous
    return app


def run_async(coro: Coroutine[Any, Any, Any]) -> int:
    """Run a coroutine; turn tokiwa errors into a message and an exit code."""
    try:
        result = _event_loop_runner()(coro)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        return exitcodes.USAGE
    except TokiwaError as exc:
        click.echo(f"error: {exc}", err=True)
        return exitcodes.FAILURE
    except RedisError as exc:
        return report_redis_error(exc)
    return result if isinstance(result, int) else exitcodes.OK


def report_redis_error(exc: BaseException) -> int:
    """Print one line naming a Redis fault and what to check; return its exit code."""
    click.echo(f"error: redis {faults.describe(exc)} ({faults.hint(exc)})", err=True)
    return redis_exit_code(exc)


def redis_exit_code(exc: BaseException) -> int:
    """The named exit code of a Redis error, by its fault class."""
    fault = faults.classify(exc)
    if fault is faults.Fault.CONNECTION:
        return exitcodes.UNAVAILABLE
    if fault in (faults.Fault.OOM, faults.Fault.FAILOVER, faults.Fault.BUSY, faults.Fault.NOSCRIPT):
        return exitcodes.TEMPFAIL
    if faults.refused_access(exc):
        return exitcodes.NOPERM
    return exitcodes.FAILURE


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """``asyncio.run``, or ``uvloop.run`` with ``TOKIWA_LOOP=uvloop`` (``pip install
    'tokiwa[uvloop]'``). Opt-in: on this project's benchmark it did not beat asyncio clearly
    and costs ~2.4 MB of RSS."""
    if os.environ.get("TOKIWA_LOOP", "asyncio") == "uvloop":
        import uvloop

        runner: Callable[[Coroutine[Any, Any, Any]], Any] = uvloop.run
        return runner
    return asyncio.run


@click.group(cls=LazyGroup, lazy={"inspect": "orchestrator.cli.inspect:inspect_group",
                                  "cancel": "orchestrator.cli.cancel:cancel_command",
                                  "dashboard": "orchestrator.cli.dashboard:dashboard_command",
                                  "redis": "orchestrator.cli.redis_cmd:redis_group"})
def cli() -> None:
    """tokiwa producer: publish events and run cron under leader election."""


def _parse_json(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} is not valid JSON: {exc}") from exc


@cli.command()
@click.argument("event_type", required=False)
@click.option("--payload", default=None, help="Event payload as JSON.")
@click.option("--metadata", default=None, help="Metadata as JSON (correlation_id, causation_id, source, tags).")
@click.option("--file", "file_", type=click.Path(exists=True, dir_okay=False),
              help="Bulk publish: a JSON-lines file of {type, payload, metadata}.")
@click.option("--batch", default=500, show_default=True, help="Events per pipelined round trip (--file).")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar (default: on a TTY).")
@click.option("--key", default=None, help="Ordering key: chatflows without a declared conversation key use it "
                                          "as the conversation id.")
@click.option("--idempotency-key", default=None, help="Publish once per key within idempotency_window_s.")
@click.option("--delay", "delay_s", type=float, default=None, help="Seconds from now the event is due.")
@click.option("--at", "at", default=None, help="When the event is due: an ISO 8601 time (2026-12-24T18:00:00+09:00).")
@common_options
def publish(event_type: str | None, payload: str | None, metadata: str | None, file_: str | None, batch: int,
            progress: bool | None, key: str | None, idempotency_key: str | None, delay_s: float | None,
            at: str | None, app_spec: str | None, **settings: Any) -> None:
    """Publish one event (TYPE --payload JSON) or many (--file events.jsonl)."""
    setup_logging(settings.pop("log_level") or "WARNING")
    if bool(event_type) == bool(file_):
        raise click.UsageError("give either an EVENT_TYPE or --file, not both or neither")
    if file_ and (key or idempotency_key or delay_s is not None or at):
        raise click.UsageError("--key, --idempotency-key, --delay and --at apply to one event; "
                               "a --file line carries its own 'key'")
    if delay_s is not None and at:
        raise click.UsageError("give --delay or --at, not both")
    at_v = None
    if at:
        try:
            at_v = datetime.fromisoformat(at)
        except ValueError as exc:
            raise click.BadParameter(f"--at is not an ISO 8601 time: {exc}") from exc
    payload_v = _parse_json(payload, "--payload")
    metadata_v = _parse_json(metadata, "--metadata")
    app = build_app(app_spec, mode="producer", **settings)

    async def one() -> int:
        try:
            event = await app.publish(cast(str, event_type), payload_v, metadata_v, key=key,  # given (checked above)
                                      idempotency_key=idempotency_key, delay_s=delay_s, at=at_v)
            out: dict[str, Any] = {"id": event.id, "stream_id": event.stream_id, "type": event.type}
            if delay_s is not None or at_v is not None:
                out["delayed"] = True
            click.echo(json.dumps(out))
        finally:
            await app.close()
        return exitcodes.OK

    async def bulk() -> int:
        from orchestrator.broker.bulk import publish_file
        try:
            count = await publish_file(app, Path(cast(str, file_)), batch=batch, progress=progress)
            click.echo(json.dumps({"published": count}))
        finally:
            await app.close()
        return exitcodes.OK

    sys.exit(run_async(one() if event_type else bulk()))


def observability_options(func: F) -> F:
    """--metrics-port / --api-port / --api-token (see docs/observability.md)."""
    for option in reversed([
        click.option("--metrics-port", type=int, default=None, help="Serve Prometheus /metrics on this port."),
        click.option("--api-port", type=int, default=None, help="Serve the runs HTTP API on this port."),
        click.option("--api-token", default=None, help="Bearer token the HTTP API requires."),
    ]):
        func = option(func)
    return func


@cli.command()
@observability_options
@common_options
def run(app_spec: str | None, **settings: Any) -> None:
    """Run the producer: cron jobs fire under leader election until SIGTERM / Ctrl+C."""
    setup_logging(settings.pop("log_level"))
    if not app_spec:
        raise click.UsageError("--app is required")
    app = build_app(app_spec, mode="producer", **settings)
    from orchestrator.cli.runtime import serve

    sys.exit(run_async(serve(app, heartbeat=False)))


@cli.command()
@click.argument("workflow")
@click.option("--input", "input_", default=None, help="Run input as JSON.")
@click.option("--context", default=None, help="Run context as JSON.")
@click.option("--conversation-id", default=None, help="Conversation id (chatflows).")
@click.option("--wait/--no-wait", default=False, help="Wait for the result and print it.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait with --wait.")
@common_options
def trigger(workflow: str, input_: str | None, context: str | None, conversation_id: str | None, wait: bool,
            timeout: float | None, app_spec: str | None, **settings: Any) -> None:
    """Start WORKFLOW (name or id) on a worker that has it, through the stream. Without --app
    the name is looked up in what workers declared; an unknown name lists what live workers
    offer (exit 2). A --wait that times out prints the run id (exit 75): the run may still
    go on, `tokiwa-producer cancel RUN_ID` stops it."""
    setup_logging(settings.pop("log_level") or "WARNING")
    input_v, context_v = _parse_json(input_, "--input"), _parse_json(context, "--context")
    app = build_app(app_spec, mode="producer", **settings)

    async def go() -> int:
        try:
            result = await app.run_workflow(workflow, input=input_v, context=context_v, wait=wait,
                                            timeout=timeout, conversation_id=conversation_id)
        except NotFoundError as exc:
            click.echo(f"error: {exc}", err=True)
            return exitcodes.USAGE
        except RunTimeoutError as exc:
            click.echo(f"error: {exc}", err=True)
            click.echo(json.dumps({"run_id": exc.run_id, "status": "timed out"}))
            return exitcodes.TEMPFAIL
        finally:
            await app.close()
        if isinstance(result, str):
            click.echo(json.dumps({"run_id": result, "status": "queued"}))
            return exitcodes.OK
        click.echo(json.dumps(result.to_record(), default=str))
        return exitcodes.OK if result.status == "succeeded" else exitcodes.FAILURE

    sys.exit(run_async(go()))


@cli.command("run-file")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--input", "input_", default=None, help="Run input as JSON.")
@click.option("--plain", is_flag=True, help="Plain trace lines instead of the cute ones (or TOKIWA_CUTE=0).")
@click.option("--no-trace", is_flag=True, help="No trace lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as JSON.")
def run_file(path: str, input_: str | None, plain: bool, no_trace: bool, as_json: bool) -> None:
    """Run a declarative workflow file (YAML / TOML / JSON) here, without Redis."""
    setup_logging("WARNING")
    from orchestrator.declarative.files import run_workflow_file
    from orchestrator.workflow.runner import Runner
    from orchestrator.workflow.trace import Tracer

    if plain:
        Tracer.set_plain()
    input_v = _parse_json(input_, "--input")
    runner = Runner() if no_trace else Runner(hooks=Tracer(stream=sys.stderr).hooks())

    async def go() -> int:
        result = await run_workflow_file(path, input=input_v, runner=runner)
        if as_json:
            click.echo(json.dumps(result.to_record(), default=str, indent=2))
        else:
            click.echo(f"{result.workflow_name}: {result.status} in {result.duration_ms:.1f} ms")
            for name, node in result.nodes.items():
                click.echo(f"  {name}: {node.status}" + (f" ({node.error.get('message')})" if node.error else ""))
        return exitcodes.OK if result.status == "succeeded" else exitcodes.FAILURE

    sys.exit(run_async(go()))


@cli.group()
def cron() -> None:
    """Cron jobs of an app."""


@cron.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def cron_list(as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Each job: expression, next fire time, last fired slot, current leader."""
    setup_logging(settings.pop("log_level") or "WARNING")
    if not app_spec:
        raise click.UsageError("--app is required")
    app = build_app(app_spec, mode="producer", **settings)

    async def go() -> int:
        try:
            rows = await app.cron.describe()
        finally:
            await app.close()
        if as_json:
            click.echo(json.dumps(rows, default=str))
            return exitcodes.OK
        headers = ("name", "kind", "expr", "next_fire", "last_fired", "leader")
        table = [headers] + [tuple(str(r.get(h) or "-") for h in headers) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
        for row in table:
            click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        return exitcodes.OK

    sys.exit(run_async(go()))


def main() -> None:
    cli(prog_name="tokiwa-producer")


if __name__ == "__main__":
    main()
