"""``tokiwa-producer``: publish events, run the producer (cron under leader election).

Thin: parse, set up logging, load ``--app``, call one library function, return a named
exit code. Settings precedence: flags > ``TOKIWA_*`` env > ``--config`` TOML > the app's own.

Errors are reported in one place for every command of both CLIs (:class:`CliGroup` and
:func:`run_async` call :func:`report_error`): one ``error: ...`` line on stderr that names
the problem and the setting to check, and a named exit code (:mod:`orchestrator.cli.exitcodes`).
The traceback is printed only with ``--debug`` (or ``TOKIWA_DEBUG=1``).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import re
import socket
import ssl
import sys
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import click
from click.core import ParameterSource
from redis import exceptions as rx
from redis.exceptions import RedisError

from orchestrator import faults
from orchestrator.app import Orchestrator
from orchestrator.cli import exitcodes
from orchestrator.cli.lazy import LazyGroup
from orchestrator.cli.loader import load_app
from orchestrator.errors import ConfigError, NotFoundError, ReplicationError, TokiwaError
from orchestrator.runs.registry import RunTimeoutError
from orchestrator.urls import redact as redact_url

F = TypeVar("F", bound=Callable[..., Any])

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
DEBUG_ENV = "TOKIWA_DEBUG"
URL_SETTING = "--redis-url / TOKIWA_REDIS_URL"
#: commands that run until a signal: they keep the fault model's "redis unreachable" lines;
#: every other command ends with its own error line, which says the same once
LONG_RUNNING = frozenset({"run", "relay", "dashboard"})


# -- logging ----------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC, ms), ``level``, ``logger``,
    ``message``, and ``exc_info`` / ``stack_info`` (their text) when present."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (click's test runner
    swaps it per invocation)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_handler: _StderrHandler | None = None
_logging_explicit = False  # --log-level or --debug given: keep every line, one-shot or not


def _formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(LOG_FORMAT)


def _chosen_log_format(log_format: str | None) -> str:
    chosen = (log_format or os.environ.get("TOKIWA_LOG_FORMAT") or "text").strip().lower()
    if chosen not in LOG_FORMATS:
        raise ConfigError(f"unknown log format {chosen!r}: use text or json", field="log_format")
    return chosen


def setup_logging(level: str | None, log_format: str | None = None) -> None:
    """Log to stderr at ``level`` (default INFO) as ``text`` lines or ``json`` objects
    (``log_format``, else ``TOKIWA_LOG_FORMAT``, else text). Called again (once the settings
    are loaded), it changes the level and format of the same handler. A command that ends by
    itself keeps the fault model's per-outage lines quiet (its own error line says it once),
    unless ``--log-level`` or ``--debug`` was given."""
    global _handler, _logging_explicit
    chosen = _chosen_log_format(log_format)
    name = (level or "INFO").strip().upper()
    if not isinstance(logging.getLevelName(name), int):
        raise ConfigError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL",
                          field="log_level")
    root = logging.getLogger()
    root.setLevel(name)
    if _handler is None:
        _handler = _StderrHandler()
    _handler.setFormatter(_formatter(chosen))
    # like logging.basicConfig: add ours only where nothing else (a test harness) handles records
    if _handler not in root.handlers and not root.handlers:
        root.addHandler(_handler)
    ctx = click.get_current_context(silent=True)
    if ctx is not None and "log_level" in ctx.params and \
            ctx.get_parameter_source("log_level") in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
        _logging_explicit = True
    if _logging_explicit:  # asked for every line: the fault model's too
        logging.getLogger("tokiwa.faults").setLevel(logging.NOTSET)


def _apply_logging_settings(app: Orchestrator) -> None:
    """Settings read from the environment or a config file that the flags did not give:
    ``log_format`` (and ``log_level`` when it was set there)."""
    s = app.settings
    given = s.model_fields_set
    if "log_format" in given or "log_level" in given:
        level = s.log_level if "log_level" in given and not _logging_explicit else None
        setup_logging(level or logging.getLevelName(logging.getLogger().level), s.log_format)


# -- --debug, --version -----------------------------------------------------------------------
def debug_enabled() -> bool:
    """``--debug`` or ``TOKIWA_DEBUG=1``: errors come with their traceback."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _logging_explicit
    if value:
        # the environment carries it to the worker processes this one starts
        os.environ[DEBUG_ENV] = "1"
        _logging_explicit = True


def debug_option(func: F) -> F:
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Print the traceback of an error (also TOKIWA_DEBUG=1).")(func)


def package_version() -> str:
    """The installed ``tokiwa`` distribution's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokiwa")
    except PackageNotFoundError:
        return "unknown (tokiwa is not installed)"


def version_option(func: F) -> F:
    def show(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            click.echo(f"{ctx.info_name} (tokiwa) {package_version()}")
            ctx.exit(exitcodes.OK)

    return click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=show,
                        help="Print the tokiwa version and exit.")(func)


# -- errors: one line, one exit code ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Problem:
    """What went wrong, for a person (one line), and the exit code that says it to a script."""

    message: str
    code: int


#: the Redis the command talks to, set once its settings are known (for the error line)
_target: dict[str, Any] = {"url": None, "timeout_ms": None}


def set_redis_target(url: str | None, timeout_ms: int | None = None) -> None:
    _target.update(url=url, timeout_ms=timeout_ms)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (any scheme, Sentinel and Cluster host
    lists included)."""
    return redact_url(url)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions behind it (redis-py wraps socket and TLS errors)."""
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in out and len(out) < 10:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def _first(exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> Any:
    return next((e for e in _chain(exc) if isinstance(e, kind)), None)


def _text(exc: BaseException) -> str:
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
    return text.rstrip(".")


_ADDRESS = re.compile(r"(?:connecting to|reading from|writing to) ([^\s]+?)\.?(?:\s|$)")


def _where(exc: BaseException) -> str:
    """`` at URL`` (password hidden), else the address redis-py names, else nothing."""
    url = _target["url"]
    if url:
        return f" at {redact(url)}"
    match = _ADDRESS.search(str(exc))
    return f" at {match.group(1)}" if match else ""


def _tls_reason(err: ssl.SSLError) -> str:
    reason = getattr(err, "verify_message", None) or getattr(err, "reason", None) or _text(err)
    return str(reason).replace("_", " ").lower() if str(reason).isupper() else str(reason)


def _speaks_plain_redis(url: str, timeout_s: float) -> bool:
    """Whether the server of ``url`` answers a plain-text PING (it is not a TLS server)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 6379), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16)[:1] in (b"+", b"-")
    except (OSError, ValueError):
        return False


def _speaks_tls(url: str, timeout_s: float) -> bool:
    """Whether the server of ``url`` completes a TLS handshake (certificates not checked)."""
    parts = urlsplit(url)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 6379), timeout=timeout_s) as sock, \
                context.wrap_socket(sock, server_hostname=parts.hostname):
            return True
    except (OSError, ValueError):
        return False


def _connection_problem(exc: BaseException) -> Problem:
    where, url = _where(exc), _target["url"] or ""
    tls_url = url.startswith("rediss://")
    if isinstance(exc, rx.BusyLoadingError):
        return Problem(f"Redis{where} is loading its data set into memory: try again in a moment",
                       exitcodes.TEMPFAIL)
    cert = _first(exc, ssl.SSLCertVerificationError)
    if cert is not None:
        return Problem(f"TLS: Redis{where} sent a certificate that is not trusted ({_tls_reason(cert)}): "
                       f"check ssl_ca_certs / ssl_check_hostname in {URL_SETTING}", exitcodes.PROTOCOL)
    tls = _first(exc, ssl.SSLError)
    if tls is not None:
        return Problem(f"TLS handshake with Redis{where} failed ({_tls_reason(tls)}): is the server speaking "
                       f"TLS (rediss://) or plain text (redis://)? check {URL_SETTING}", exitcodes.PROTOCOL)
    timed_out = _first(exc, (rx.TimeoutError, TimeoutError, socket.timeout, asyncio.TimeoutError))
    if timed_out is not None and tls_url and _speaks_plain_redis(url, 1.0):
        return Problem(f"TLS: Redis{where} speaks plain text, not TLS (it never answers a TLS handshake): "
                       f"use redis:// in {URL_SETTING}", exitcodes.PROTOCOL)
    oserr = _first(exc, OSError)
    if isinstance(oserr, (ConnectionResetError, BrokenPipeError)) and url.startswith("redis://") and \
            _speaks_tls(url, 1.0):
        return Problem(f"TLS: Redis{where} requires TLS (it drops plain-text clients): use rediss:// in "
                       f"{URL_SETTING}", exitcodes.PROTOCOL)
    if isinstance(oserr, FileNotFoundError) and tls_url:
        return Problem(f"TLS: a certificate or key file named in the Redis URL does not exist ({_text(oserr)}): "
                       f"check ssl_ca_certs / ssl_certfile / ssl_keyfile in {URL_SETTING}", exitcodes.USAGE)
    if isinstance(oserr, socket.gaierror):
        reason = f"unknown host: {_text(oserr).lower()}"
    elif isinstance(oserr, ConnectionRefusedError):
        reason = "connection refused"
    elif isinstance(oserr, FileNotFoundError):
        reason = "no such socket file"
    elif timed_out is not None:
        ms = _target["timeout_ms"]
        reason = f"no answer within {ms} ms" if ms else "timed out"
        if tls_url:
            reason += "; a plain-text Redis never answers a TLS handshake"
    else:
        reason = _text(oserr if oserr is not None else exc)
    return Problem(f"cannot reach Redis{where} ({reason}): check {URL_SETTING}", exitcodes.UNAVAILABLE)


def explain_redis(exc: BaseException) -> Problem:
    """The problem a Redis error (or a socket error under one) is, by its fault class."""
    where = _where(exc)
    refused = faults.refused_access(exc)
    if refused == "password":
        if "required" in str(exc).lower() or str(exc).upper().startswith("NOAUTH"):
            return Problem(f"Redis{where} requires a password: put it in the URL "
                           f"(redis://:PASSWORD@host:port/db); check {URL_SETTING}", exitcodes.NOPERM)
        return Problem(f"Redis{where} refused the password or user ({_text(exc)}): check {URL_SETTING}",
                       exitcodes.NOPERM)
    if refused == "acl":
        return Problem(f"Redis{where} refused a command by an ACL rule ({_text(exc)}): give the ACL user "
                       "the permissions docs/faults.md lists", exitcodes.NOPERM)
    fault = faults.classify(exc)
    if fault is faults.Fault.CONNECTION or _first(exc, ssl.SSLError) is not None:  # TLS faults are fatal
        return _connection_problem(exc)
    if fault is faults.Fault.OOM:
        return Problem(f"Redis{where} is full (maxmemory with noeviction): raise maxmemory, or let workers "
                       "drain the stream", exitcodes.TEMPFAIL)
    if fault in (faults.Fault.FAILOVER, faults.Fault.BUSY, faults.Fault.NOSCRIPT):
        return Problem(f"Redis{where} cannot answer now ({_text(exc)}): try again in a moment", exitcodes.TEMPFAIL)
    if fault is faults.Fault.NOGROUP:
        return Problem(f"a consumer group is missing on Redis{where} ({_text(exc)}): start a worker, which "
                       "creates it", exitcodes.FAILURE)
    if str(exc).upper().startswith("WRONGTYPE"):
        return Problem(f"a key on Redis{where} holds the wrong type ({_text(exc)}): does another program use "
                       "this namespace? check --namespace / TOKIWA_NAMESPACE", exitcodes.FAILURE)
    return Problem(f"Redis{where} answered an error ({_text(exc)}): see docs/faults.md", exitcodes.FAILURE)


_CONFIG_HINTS = {
    "app": "check --app / TOKIWA_APP",
    "config": "check --config / TOKIWA_CONFIG",
    "log_level": "check --log-level / TOKIWA_LOG_LEVEL",
    "log_format": "check --log-format / TOKIWA_LOG_FORMAT",
}


def _config_hint(exc: ConfigError) -> str:
    """The setting to check; settings errors name where their value came from themselves."""
    return _CONFIG_HINTS.get(exc.field or "", "")


def explain(exc: BaseException) -> Problem:
    """Any error a command can end with, as one line and an exit code."""
    if isinstance(exc, RedisError):
        return explain_redis(exc)
    if isinstance(exc, ConfigError):
        hint, text = _config_hint(exc), str(exc).rstrip(".")
        return Problem(f"{text}: {hint}" if hint else text, exitcodes.USAGE)
    if isinstance(exc, RunTimeoutError):
        return Problem(f"run {exc.run_id} did not finish within --timeout; it may still run: "
                       f"`tokiwa-producer cancel {exc.run_id}` stops it", exitcodes.TEMPFAIL)
    if isinstance(exc, ReplicationError):  # stored on the master, not yet on enough replicas
        return Problem(f"{exc}: check the replicas (INFO replication) or publish_wait_replicas / "
                       "TOKIWA_PUBLISH_WAIT_REPLICAS", exitcodes.TEMPFAIL)
    if isinstance(exc, TokiwaError):
        return Problem(str(exc), exitcodes.FAILURE)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return Problem(f"cannot listen: {_text(exc)}: check --metrics-port / --api-port (another process "
                       "uses the port)", exitcodes.USAGE)
    if isinstance(exc, OSError) and faults.classify(exc) is faults.Fault.CONNECTION and \
            isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return _connection_problem(exc)
    return Problem(f"unexpected {type(exc).__name__}: {_text(exc)} (--debug or TOKIWA_DEBUG=1 prints the "
                   "traceback)", exitcodes.FAILURE)


def report_error(exc: BaseException) -> int:
    """Print ``exc`` as one ``error: ...`` line on stderr (after its traceback with
    ``--debug``); return its exit code."""
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    problem = explain(exc)
    click.echo(f"error: {problem.message}", err=True)
    return problem.code


def report_redis_error(exc: BaseException) -> int:
    """Print one line naming a Redis fault and what to check; return its exit code."""
    return report_error(exc)


def redis_exit_code(exc: BaseException) -> int:
    """The named exit code of a Redis error, by its fault class."""
    return explain_redis(exc).code


class CliGroup(LazyGroup):
    """The command group of both CLIs: ``--version``, ``--debug``, and the one place where an
    error escaping any subcommand (lazily loaded ones included) becomes one line and an exit
    code. Click's own usage errors and exits pass through unchanged."""

    def invoke(self, ctx: click.Context) -> Any:
        faults_log = logging.getLogger("tokiwa.faults")
        level = faults_log.level  # quieted for a one-shot command, restored after it
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            ctx.exit(report_error(exc))
        finally:
            faults_log.setLevel(level)


def _quiet_faults(command: str | None) -> None:
    """A command that ends by itself prints its own error line: the fault model's per-outage
    lines (``redis unreachable ...``) would say it twice, so they stay quiet, unless
    ``--debug`` or an explicit ``--log-level`` (see :func:`setup_logging`) asks for them."""
    quiet = command not in LONG_RUNNING and not (_logging_explicit or debug_enabled())
    logging.getLogger("tokiwa.faults").setLevel(logging.CRITICAL if quiet else logging.NOTSET)


def cli_group(**lazy: str) -> Callable[[Callable[..., Any]], CliGroup]:
    """``@cli_group(name="module:attr", ...)``: a :class:`CliGroup` with ``--version`` and ``--debug``."""
    def decorate(func: Callable[..., Any]) -> CliGroup:
        @functools.wraps(func)
        def callback(*args: Any, **kwargs: Any) -> Any:
            _quiet_faults(click.get_current_context().invoked_subcommand)
            return func(*args, **kwargs)

        group: CliGroup = click.group(cls=CliGroup, lazy=lazy)(debug_option(version_option(callback)))
        return group
    return decorate


# -- options shared by the commands -----------------------------------------------------------
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
        click.option("--log-format", default=None, type=click.Choice(LOG_FORMATS),
                     help="Log lines as text (default) or one JSON object per line (also TOKIWA_LOG_FORMAT)."),
    ]
    for option in reversed(options):
        func = option(func)
    return debug_option(func)


def cron_options(func: F) -> F:
    """--cron-tz / --cron-lease-ms / --cron-missed-policy (the cron_* settings)."""
    for option in reversed([
        click.option("--cron-tz", default=None, help="Time zone of cron expressions, e.g. Asia/Tokyo "
                                                     "(default: the host's; also TOKIWA_CRON_TZ)."),
        click.option("--cron-lease-ms", type=int, default=None,
                     help="Cron leader lease: a standby takes over within it (default 15000)."),
        click.option("--cron-missed-policy", type=click.Choice(("latest", "all", "none")), default=None,
                     help="Slots missed while no leader ran: fire the latest once (default), all, or none."),
    ]):
        func = option(func)
    return func


def build_app(app_spec: str | None, *, mode: str, **settings: Any) -> Orchestrator:
    """Load ``--app`` (or a bare Orchestrator) and apply CLI settings over it. A bad app or
    setting exits with one line and USAGE."""
    config_file = settings.pop("config_file", None)
    settings.setdefault("log_format", None)
    setup_logging(logging.getLevelName(logging.getLogger().level), settings["log_format"])
    previous = os.environ.get("TOKIWA_CONFIG")
    try:
        if config_file:  # an app module may build its Orchestrator at import time
            os.environ["TOKIWA_CONFIG"] = str(config_file)
        app: Orchestrator = load_app(app_spec) if app_spec else Orchestrator()
        app.mode = mode  # type: ignore[assignment]
        app.configure(config_file=config_file, **settings)
    except ConfigError as exc:
        sys.exit(report_error(exc))
    finally:
        if config_file:
            if previous is None:
                os.environ.pop("TOKIWA_CONFIG", None)
            else:
                os.environ["TOKIWA_CONFIG"] = previous
    set_redis_target(app.settings.redis_url, app.settings.redis_timeout_ms)
    _apply_logging_settings(app)
    return app


def run_async(coro: Coroutine[Any, Any, Any], *, loop: str | None = None) -> int:
    """Run a coroutine on the event loop ``loop`` names (None: ``TOKIWA_LOOP``, else uvloop
    when installed; :mod:`orchestrator.cli.loops`); turn any error into one line and a named
    exit code."""
    from orchestrator.cli.loops import loop_runner

    try:
        runner = loop_runner(loop)
    except Exception as exc:
        coro.close()
        return report_error(exc)
    try:
        result = runner(coro)
    except Exception as exc:
        return report_error(exc)
    return result if isinstance(result, int) else exitcodes.OK


@cli_group(inspect="orchestrator.cli.inspect:inspect_group",
           cancel="orchestrator.cli.cancel:cancel_command",
           dashboard="orchestrator.cli.dashboard:dashboard_command",
           redis="orchestrator.cli.redis_cmd:redis_group",
           plugins="orchestrator.cli.plugins:plugins_group")
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
@cron_options
@observability_options
@common_options
def run(app_spec: str | None, **settings: Any) -> None:
    """Run the producer: cron jobs fire under leader election until SIGTERM / Ctrl+C."""
    setup_logging(settings.pop("log_level"), settings.get("log_format"))
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
            click.echo(json.dumps({"run_id": exc.run_id, "status": "timed out"}))
            return report_error(exc)
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
    from orchestrator.workflow.interrupt import RunCapture, interrupted_exit
    from orchestrator.workflow.runner import Runner
    from orchestrator.workflow.trace import Tracer

    if plain:
        Tracer.set_plain()
    input_v = _parse_json(input_, "--input")
    capture = RunCapture()  # Ctrl+C: one "cancelled" line naming the run, exit 130
    runner = Runner(hooks=capture) if no_trace else Runner(hooks=[Tracer(stream=sys.stderr).hooks(), capture])

    async def go() -> int:
        result = await run_workflow_file(path, input=input_v, runner=runner)
        if as_json:
            click.echo(json.dumps(result.to_record(), default=str, indent=2))
        else:
            click.echo(f"{result.workflow_name}: {result.status} in {result.duration_ms:.1f} ms")
            for name, node in result.nodes.items():
                click.echo(f"  {name}: {node.status}" + (f" ({node.error.get('message')})" if node.error else ""))
        return exitcodes.OK if result.status == "succeeded" else exitcodes.FAILURE

    sys.exit(interrupted_exit(lambda: run_async(go()), capture))


@cli.group()
def cron() -> None:
    """Cron jobs of an app."""


@cron.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@cron_options
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
