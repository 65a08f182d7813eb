"""``tokiwa-worker relay CONFIG``: run a Miclow relay on its own.

    tokiwa-worker relay relay.toml                      # Miclow's positional form
    tokiwa-worker relay --config relay.toml             # the Miclow README's form
    python -m workers.relay.cli relay.toml --redis-url redis://host:6379/0 --namespace tokiwa

Without ``--redis-url`` / ``TOKIWA_REDIS_URL`` it uses the state directory's shared embedded
redis-server (the one this host's workers and producers use; peers on other hosts need a
shared URL).
Lines typed on the relay's own stdin are published on the topic ``system`` (as Miclow does);
end of file on stdin does not stop the relay. SIGINT / SIGTERM stop it gracefully (children
get SIGTERM, then SIGKILL after ``shutdown_grace_s``); a second signal exits at once.

Exit codes: 0 after a signal, 1 when the relay cannot go on (Redis refuses it: an ACL rule,
a password; or a background task keeps dying; one error line says why and what to change),
2 for a bad config, 69 when Redis cannot be reached at start, 130 on a second signal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import click

from orchestrator.broker.embedded import shared_embedded_url
from orchestrator.cli.exitcodes import FAILURE, FORCED, OK, UNAVAILABLE, USAGE
from orchestrator.config import Settings, load_settings
from orchestrator.errors import BrokerError, ConfigError
from workers.relay.config import RelayConfig, load_relay_config
from workers.relay.core import Relay
from workers.relay.transport import RelayFatalError

log = logging.getLogger("tokiwa.relay")

CONSOLE_TOPIC = "system"


async def _pump_console(relay: Relay) -> None:
    """Publish each non-empty line typed on our stdin on the ``system`` topic."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (OSError, ValueError) as exc:
        log.warning("relay: console input unavailable: %s", exc)
        return
    try:
        while line := await reader.readline():  # EOF ends the pump, not the relay
            text = line.decode("utf-8", errors="replace").strip()
            if text:
                relay.route(CONSOLE_TOPIC, text, "console")
                if (wait := relay.pace("console")) is not None:
                    await wait
    finally:
        transport.close()


async def serve(config: RelayConfig, *, redis_url: str, namespace: str, console_input: bool = False) -> int:
    """Run a relay until SIGINT/SIGTERM (exit code 0) or until it cannot go on (it has logged
    one error line saying why; exit code 1); returns the process exit code."""
    loop = asyncio.get_running_loop()
    stop, signals = asyncio.Event(), {"count": 0}

    def on_signal() -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            os._exit(FORCED)
        stop.set()

    relay = Relay(config, redis_url=redis_url, namespace=namespace)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await relay.start()
        click.echo("System running. Press Ctrl+C to stop.")
        if console_input:
            relay._spawn(_pump_console(relay), "console")  # noqa: SLF001 - owned and stopped by the relay
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(relay.wait_failed())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
    finally:
        await relay.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if relay.failure is not None:  # the relay logged why
        return FAILURE
    click.echo("Graceful shutdown completed")
    return OK


def _redis_url(settings: Settings) -> str:
    """The configured URL, else the state directory's shared embedded redis-server (the one
    the workers and producers of this host use too)."""
    if settings.redis_url:
        return settings.redis_url
    url = shared_embedded_url(settings.state_dir)
    click.echo(f"embedded redis at {url} (shared by this state dir)", err=True)
    return url


@click.command("relay")
@click.argument("config_path", required=False, type=click.Path(dir_okay=False))
@click.option("--config", "config_opt", type=click.Path(dir_okay=False), help="Relay TOML file (same as CONFIG).")
@click.option("--redis-url", default=None, help="Redis URL (default: TOKIWA_REDIS_URL, else an embedded redis-server).")
@click.option("--namespace", default=None, help="Key prefix (default: TOKIWA_NAMESPACE, else tokiwa).")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING ... (default: TOKIWA_LOG_LEVEL, else INFO).")
@click.option("--console/--no-console", default=False, help="Publish lines typed on stdin on topic 'system'.")
def relay_command(
    config_path: str | None, config_opt: str | None, redis_url: str | None, namespace: str | None,
    log_level: str | None, console: bool,
) -> None:
    """Run the Miclow relay of CONFIG (a Miclow-compatible TOML file) on its own."""
    if config_path and config_opt and Path(config_path) != Path(config_opt):
        raise click.UsageError("give the config file once: CONFIG or --config")
    path = config_path or config_opt
    if not path:
        raise click.UsageError("missing relay config file: tokiwa-worker relay relay.toml")
    try:
        settings = load_settings({"redis_url": redis_url, "namespace": namespace, "log_level": log_level})
        # logging first: loading the file may warn (a restart delay below the minimum ...)
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        config = load_relay_config(path)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(USAGE)
    if config.publish_events:
        log.warning("publish_events is set but a relay alone publishes no events; use tokiwa-worker run --relay")
    url = _redis_url(settings)
    try:
        code = asyncio.run(serve(config, redis_url=url, namespace=settings.namespace, console_input=console))
    except RelayFatalError as exc:  # Redis refused the relay at start (an ACL rule ...)
        click.echo(f"error: {exc}", err=True)
        code = FAILURE
    except BrokerError as exc:
        click.echo(f"error: {exc}", err=True)
        code = UNAVAILABLE
    sys.exit(code)


if __name__ == "__main__":
    relay_command()
