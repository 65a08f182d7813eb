"""``tokiwa-producer dashboard``: serve the web dashboard alone, against one namespace's Redis.

It needs no worker: it reads Redis through the same Inspector as ``tokiwa-producer inspect``
(opened by that command's helper, so with ``--redis-url`` it writes nothing to Redis). With
``--app`` it also knows the app's workflows (a run's DAG is drawn with its edges) and cron
jobs (their expression and next fire). Requeue and purge need ``--api-token`` (and the UI
asks for it); without it the dashboard is read-only.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import click
from aiohttp import web
from redis.exceptions import RedisError

from orchestrator.cli import exitcodes
from orchestrator.cli.inspect import _open
from orchestrator.cli.producer import build_app, common_options, report_redis_error, run_async, setup_logging
from orchestrator.ops.dashboard import MOUNT, Dashboard, DashboardData

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def standalone_app(dashboard: Dashboard) -> web.Application:
    """The dashboard at ``/dashboard/``, ``/`` redirecting to it, and ``/healthz``."""
    root = web.Application()

    async def home(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(MOUNT + "/")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    root.router.add_get("/", home)
    root.router.add_get("/healthz", healthz)
    dashboard.mount(root, MOUNT)
    return root


async def serve(app: Any, host: str, port: int, token: str | None) -> int:
    """Serve until SIGINT / SIGTERM; returns the exit code."""
    try:
        inspector, close = await _open(app)
    except RedisError as exc:
        return report_redis_error(exc)
    try:
        try:
            await inspector.redis.ping()
        except RedisError as exc:
            return report_redis_error(exc)
        dashboard = Dashboard(DashboardData(lambda: inspector, app), token)
        runner = web.AppRunner(standalone_app(dashboard), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            bound = runner.addresses[0][1] if runner.addresses else port
            shown = f"[{host}]" if ":" in host else host
            mode = "requeue and purge with the bearer token" if token else "read-only (no --api-token)"
            click.echo(f"dashboard on http://{shown}:{bound}{MOUNT}/ ({mode}); Ctrl+C stops it", err=True)
            stopped = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stopped.set)
            await stopped.wait()
        finally:
            await runner.cleanup()
    finally:
        await close()
    return exitcodes.OK


@click.command("dashboard")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to bind (0 = a free one, printed at start).")
@click.option("--api-token", default=None, envvar="TOKIWA_API_TOKEN",
              help="Bearer token that enables requeue and purge (also TOKIWA_API_TOKEN).")
@common_options
def dashboard_command(host: str, port: int, api_token: str | None, app_spec: str | None, **settings: Any) -> None:
    """Serve the web dashboard (runs, workers, streams, dead letters, cron ...) on HOST:PORT."""
    setup_logging(settings.pop("log_level", None) or "WARNING")
    if api_token is not None and not api_token.strip():
        raise click.BadParameter("must not be blank", param_hint="--api-token")
    if host not in LOOPBACK:
        click.echo(f"warning: the dashboard on {host} shows run records and dead letters to anyone who can "
                   "reach the port; put it behind a proxy that authenticates", err=True)
    app = build_app(app_spec, mode="producer", **settings)
    sys.exit(run_async(serve(app, host, port, api_token)))
