"""``tokiwa-worker start | ps | stop | logs``: manage detached workers on this host.

The commands are attached to the ``tokiwa-worker`` group by :mod:`workers.cli`. They parse
arguments and call :class:`workers.processes.procman.ProcessManager`; ``ps --cluster`` reads the
heartbeats every worker writes to ``{namespace}:workers``.

The state dir (where instance folders live) is ``--state-dir``, else ``TOKIWA_STATE_DIR``,
else the per-user default of :func:`orchestrator.config.default_state_dir`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import click

from orchestrator.cli import exitcodes
from orchestrator.config import Settings, load_settings
from orchestrator.errors import ConfigError, InvalidArgumentError, TokiwaError
from orchestrator.keys import Keys
from orchestrator.ops.heartbeats import STALE_HEARTBEATS, worker_beats
from workers.processes.procman import Instance, ProcessManager

STOP_MARGIN_S = 5.0  # stop waits the worker's own grace period plus this, then SIGKILLs


def _handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn tokiwa errors into a one-line message and a named exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ConfigError, InvalidArgumentError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exitcodes.USAGE)
        except TokiwaError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exitcodes.FAILURE)

    return wrapper


def _settings(state_dir: Path | None = None, *, config: str | None = None, **overrides: Any) -> Settings:
    return load_settings({"state_dir": state_dir, **overrides}, config_file=config)


def _state_dir_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Folder of instance folders (default: TOKIWA_STATE_DIR, else a per-user temp folder).",
    )(func)


def format_duration(seconds: float | None) -> str:
    """``None`` -> ``-``; 75 -> ``1m15s``; 7300 -> ``2h01m``; 90000 -> ``1d01h``."""
    if seconds is None:
        return "-"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [headers] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


# -- start --------------------------------------------------------------------------------------


@click.command("start", context_settings={"ignore_unknown_options": True})
@click.option("--name", required=True, help="Instance name: letters, digits, '.', '_', '-'.")
@_state_dir_option
@click.option("--check-s", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Watch the new worker this long and fail if it dies at once.")
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED)
@_handle_errors
def start_command(name: str, state_dir: Path | None, check_s: float, run_args: tuple[str, ...]) -> None:
    """Start `tokiwa-worker run RUN_ARGS...` detached, as instance NAME.

    Every option that `start` does not know is passed to `run`, e.g.
    `tokiwa-worker start --name w1 --app examples.shop:app --concurrency 8`.
    """
    settings = _settings(state_dir)
    if not settings.redis_url and not any(a.startswith(("--redis-url", "--config")) for a in run_args):
        click.echo(f"note: no --redis-url or TOKIWA_REDIS_URL: this worker uses the embedded Redis of "
                   f"{settings.state_dir} (shared by every tokiwa process of that state dir on this host)", err=True)
    env = dict(os.environ, TOKIWA_STATE_DIR=str(settings.state_dir), PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "workers.cli", "run", *run_args]
    manager = ProcessManager(settings.state_dir)
    inst = manager.start(name, argv, env=env, cwd=os.getcwd())
    deadline = time.monotonic() + check_s
    while time.monotonic() < deadline and inst.alive:
        time.sleep(min(0.05, check_s))
        inst = manager.get(name)
    if not inst.alive:
        click.echo(f"error: worker {name!r} exited at once; last lines of {inst.err_log}:", err=True)
        for line in manager.tail(name, 20, err=True):
            click.echo(f"  {line}", err=True)
        sys.exit(exitcodes.FAILURE)
    click.echo(f"started {name} (pid {inst.pid}); logs: {inst.out_log}")


# -- ps -----------------------------------------------------------------------------------------


def _local_rows(instances: list[Instance], now: float) -> list[list[Any]]:
    return [
        [i.name, i.pid, "alive" if i.alive else "dead", format_duration(i.uptime_s(now)), i.folder]
        for i in instances
    ]


def cluster_workers(entries: Mapping[bytes | str, bytes], *, now: float, stale_after_s: float) -> list[dict[str, Any]]:
    """Decode the ``{ns}:workers`` hash (worker id -> msgpack heartbeat) into sorted records.

    Each record is the heartbeat plus ``id``, ``status`` (``live``, ``stale`` when its
    ``last_seen`` is older than ``stale_after_s``, or ``undecodable``) and ``age_s``.
    """
    records: list[dict[str, Any]] = []
    for w in worker_beats(entries, now=now, stale_after_s=stale_after_s):
        if w.beat is None:
            records.append({"id": w.id, "status": "undecodable", "age_s": None})
        else:
            records.append({**w.beat, "id": w.id, "status": "stale" if w.stale else "live", "age_s": w.age_s})
    return sorted(records, key=lambda r: (str(r.get("host", "")), r["id"]))


def _cluster_rows(records: list[dict[str, Any]], now: float) -> list[list[Any]]:
    rows = []
    for r in records:
        started = r.get("started")
        uptime = now - started if isinstance(started, (int, float)) else None
        age = r.get("age_s")
        rows.append([
            r["id"], r.get("host"), r.get("pid"), r["status"], format_duration(uptime),
            r.get("in_flight"), r.get("processed"), f"{age:.1f}s ago" if age is not None else None,
        ])
    return rows


def _read_cluster(settings: Settings, now: float) -> list[dict[str, Any]]:
    if not settings.redis_url:
        raise ConfigError("ps --cluster needs a shared Redis: pass --redis-url or set TOKIWA_REDIS_URL",
                          field="redis_url")
    import redis

    from orchestrator.broker.connection import create_sync_redis

    client = create_sync_redis(settings.redis_url, timeout_ms=settings.redis_timeout_ms)
    try:
        entries = cast("dict[bytes | str, bytes]", client.hgetall(Keys(settings.namespace).workers))  # bytes values
    except redis.RedisError as exc:
        from orchestrator.cli.producer import report_redis_error

        sys.exit(report_redis_error(exc))
    finally:
        client.close()
    return cluster_workers(entries, now=now, stale_after_s=STALE_HEARTBEATS * settings.heartbeat_interval_s)


@click.command("ps")
@click.option("--cluster", is_flag=True, help="Every worker on every host, from the heartbeats in Redis.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@_state_dir_option
@click.option("--redis-url", default=None, help="Redis URL for --cluster (default: TOKIWA_REDIS_URL).")
@click.option("--namespace", default=None, help="Key prefix for --cluster (default tokiwa).")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="TOML settings file (also TOKIWA_CONFIG).")
@_handle_errors
def ps_command(cluster: bool, as_json: bool, state_dir: Path | None, redis_url: str | None,
               namespace: str | None, config_file: str | None) -> None:
    """List local worker instances (alive or dead, uptime), or with --cluster every live worker."""
    settings = _settings(state_dir, redis_url=redis_url, namespace=namespace, config=config_file)
    now = time.time()
    if cluster:
        records = _read_cluster(settings, now)
        if as_json:
            click.echo(json.dumps(records, indent=2, default=str))
            return
        headers = ["WORKER", "HOST", "PID", "STATUS", "UPTIME", "IN_FLIGHT", "PROCESSED", "LAST_SEEN"]
        click.echo(format_table(headers, _cluster_rows(records, now)))
        return
    instances = ProcessManager(settings.state_dir).instances()
    if as_json:
        click.echo(json.dumps([i.as_dict(now) for i in instances], indent=2))
        return
    click.echo(format_table(["NAME", "PID", "STATUS", "UPTIME", "FOLDER"], _local_rows(instances, now)))


# -- stop ---------------------------------------------------------------------------------------

_OUTCOME_TEXT = {
    "terminated": "stopped",
    "killed": "killed after the grace period",
    "stale": "was not running; cleaned its stale pid file",
    "invalid_pid": "had an unreadable pid file; cleaned",
}


@click.command("stop")
@click.argument("name", required=False)
@click.option("--all", "stop_all", is_flag=True, help="Stop every local instance.")
@click.option("--grace-s", type=click.FloatRange(min=0), default=None,
              help=f"Seconds between SIGTERM and SIGKILL (default: grace_period_s + {STOP_MARGIN_S:g}).")
@_state_dir_option
@_handle_errors
def stop_command(name: str | None, stop_all: bool, grace_s: float | None, state_dir: Path | None) -> None:
    """SIGTERM instance NAME (or --all), wait, then SIGKILL; remove its folder."""
    if bool(name) == stop_all:
        raise click.UsageError("give either NAME or --all")
    settings = _settings(state_dir)
    grace = settings.grace_period_s + STOP_MARGIN_S if grace_s is None else grace_s
    manager = ProcessManager(settings.state_dir)
    results = manager.stop_all(grace_s=grace) if stop_all else [manager.stop(cast(str, name), grace_s=grace)]  # name given (checked above)
    if not results:
        click.echo("no local workers")
    for result in results:
        click.echo(f"{result.name} (pid {result.pid}): {_OUTCOME_TEXT.get(result.outcome, result.outcome)}")


# -- logs ---------------------------------------------------------------------------------------


@click.command("logs")
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the worker exits.")
@click.option("--err", is_flag=True, help="Show err.log (stderr) instead of out.log.")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many of the last lines to show first.")
@_state_dir_option
@_handle_errors
def logs_command(name: str, follow: bool, err: bool, lines: int, state_dir: Path | None) -> None:
    """Print the last lines of instance NAME's out.log (or err.log with --err)."""
    manager = ProcessManager(_settings(state_dir).state_dir)
    if not follow:
        for line in manager.tail(name, lines, err=err):
            click.echo(line)
        return
    try:
        for line in manager.follow(name, lines=lines, err=err):
            click.echo(line)
    except KeyboardInterrupt:
        pass
