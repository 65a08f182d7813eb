"""``tokiwa-producer redis …``: the shared embedded redis-server of a state directory.

``status`` says whether it runs (URL, pid, data dir, memory, clients, what is queued);
``stop`` shuts it down and prints what it still held (kept in its AOF: the next tokiwa process
without a Redis URL starts it again with that data). Both read the state directory from
``--state-dir`` > ``TOKIWA_STATE_DIR`` > ``--config`` TOML > the default. docs/embedded.md.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from orchestrator.broker.embedded import SharedEmbeddedRedis
from orchestrator.cli import exitcodes
from orchestrator.cli.producer import F, setup_logging
from orchestrator.config import Settings, load_settings
from orchestrator.errors import ConfigError, TokiwaError


def _options(func: F) -> F:
    for option in reversed([
        click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="State directory (default: TOKIWA_STATE_DIR, else $TMPDIR/tokiwa-$USER)."),
        click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
                     help="TOML settings file (also TOKIWA_CONFIG)."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON."),
    ]):
        func = option(func)
    return func


def _settings(state_dir: Path | None, config_file: str | None) -> Settings:
    try:
        return load_settings({"state_dir": state_dir}, config_file=config_file)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exitcodes.USAGE)


def _run(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except TokiwaError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exitcodes.FAILURE)


def _url_note(settings: Settings) -> None:
    if settings.redis_url:
        click.echo("note: a Redis URL is configured (TOKIWA_REDIS_URL or --config): tokiwa processes "
                   "use it, not this embedded server", err=True)


def queued_lines(summary: dict[str, Any]) -> list[str]:
    """What :func:`~orchestrator.broker.embedded.queued_summary` found, one line per namespace."""
    lines = []
    for ns in summary.get("namespaces") or []:
        parts = [f"stream {ns['events']}"]
        parts += [f"{g['group']} {g['pending']} pending + {g['undelivered']} undelivered" for g in ns["groups"]]
        parts += [f"delayed {ns['delayed']}", f"dead {ns['dead']}"]
        lines.append(f"  {ns['namespace']}: {ns['queued']} queued ({', '.join(parts)})")
    return lines


@click.group("redis")
def redis_group() -> None:
    """The shared embedded redis-server (used when no Redis URL is set)."""


@redis_group.command("status")
@_options
def status_command(state_dir: Path | None, config_file: str | None, as_json: bool) -> None:
    """Whether it runs: URL, pid, data dir, memory, clients, what is queued."""
    setup_logging("WARNING")
    settings = _settings(state_dir, config_file)
    server = SharedEmbeddedRedis(settings.state_dir)
    info = _run(server.status)
    if as_json:
        click.echo(json.dumps(info))
        return
    _url_note(settings)
    if not info["running"]:
        click.echo(f"embedded redis-server: not running (files in {server.dir})")
        if info["stale"]:
            click.echo("  server.json names a server that is gone: the next tokiwa process replaces it")
        return
    click.echo("embedded redis-server: running")
    rows = [("url", info["url"]), ("pid", str(info["pid"])), ("data dir", f"{info['dir']} (AOF)"),
            ("binary", f"{info['binary']} ({info['version']})"), ("uptime", f"{info['uptime_s']} s"),
            ("memory", info["used_memory_human"]), ("clients", str(info["clients"])),
            ("keys", str(info["keys"])), ("queued", str(info["queued"]))]
    for name, value in rows:
        click.echo(f"  {name:<9} {value}")
    for line in queued_lines(info):
        click.echo(f"  {line}")


@redis_group.command("stop")
@_options
def stop_command(state_dir: Path | None, config_file: str | None, as_json: bool) -> None:
    """Stop it and print what it still held (kept in its AOF for the next start)."""
    setup_logging("WARNING")
    settings = _settings(state_dir, config_file)
    server = SharedEmbeddedRedis(settings.state_dir)
    summary = _run(server.stop)
    if as_json:
        click.echo(json.dumps({"stopped": summary is not None, **(summary or {})}))
        return
    _url_note(settings)
    if summary is None:
        click.echo(f"no embedded redis-server runs (files in {server.dir})")
        return
    click.echo(f"stopped the embedded redis-server pid {summary['pid']} ({summary['url']})")
    queued = summary.get("queued")
    if queued is None:
        click.echo("queued: unknown (it closed the connection before answering)")
    elif queued:
        click.echo(f"still queued: {queued} (kept in {server.dir}: the next tokiwa process without a "
                   "Redis URL starts the server again with them)")
        for line in queued_lines(summary):
            click.echo(line)
    else:
        click.echo("still queued: 0")
    if summary.get("clients"):
        click.echo(f"note: {summary['clients']} client connection(s) were open (workers?); they retry "
                   "until a tokiwa process starts the server again", err=True)
