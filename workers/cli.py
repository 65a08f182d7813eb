"""``tokiwa-worker``: run workers, the relay, and manage local worker processes.

Thin: parse, set up logging, load ``--app``, call one library function, return a named
exit code. Errors are one line and a named exit code, as in ``tokiwa-producer``
(:func:`orchestrator.cli.producer.report_error`); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from orchestrator.cli.loops import LOOP_ENV, LOOPS
from orchestrator.cli.producer import (
    build_app,
    cli_group,
    common_options,
    observability_options,
    run_async,
    setup_logging,
)
from orchestrator.cli.runtime import serve


@cli_group(relay="workers.relay.cli:relay_command",
           start="workers.processes.manage_cli:start_command",
           ps="workers.processes.manage_cli:ps_command",
           stop="workers.processes.manage_cli:stop_command",
           logs="workers.processes.manage_cli:logs_command")
def cli() -> None:
    """tokiwa worker: consume events, run workflows and relay topics."""


@cli.command()
@click.option("--concurrency", "-c", type=int, default=None, help="Events processed at once.")
@click.option("--relay", "relay_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Also run a Miclow relay from this TOML file.")
@click.option("--processes", "-p", type=int, default=1, show_default=True,
              help="Supervise P worker processes on this host.")
@click.option("--plain", is_flag=True, help="Plain run lines instead of the cute ones (or TOKIWA_CUTE=0).")
@click.option("--run-lines/--no-run-lines", default=True, show_default=True,
              help="Print one line per finished workflow run.")
@click.option("--loop", type=click.Choice(LOOPS), envvar=LOOP_ENV, default="auto", show_default=True,
              help="Event loop: uvloop when installed (auto), or asyncio's, or uvloop (or TOKIWA_LOOP).")
@observability_options
@common_options
def run(concurrency: int | None, relay_file: str | None, processes: int, plain: bool, run_lines: bool,
        loop: str, app_spec: str | None, **settings: Any) -> None:
    """Consume events until SIGTERM / Ctrl+C (graceful), a second signal exits at once."""
    setup_logging(settings.pop("log_level"), settings.get("log_format"))
    if not app_spec:
        raise click.UsageError("--app is required")
    if processes > 1 and settings.get("api_port") is not None:
        raise click.UsageError("--api-port serves one process: run the API from the producer or a "
                               "single worker, not with --processes")
    if processes > 1:
        from workers.processes.supervise import supervise_cli

        sys.exit(supervise_cli(sys.argv, processes, metrics_port=settings.get("metrics_port"),
                               metrics_host=settings.get("metrics_host") or "127.0.0.1"))
    app = build_app(app_spec, mode="worker", concurrency=concurrency, **settings)
    if run_lines:
        from orchestrator.ops.runlines import install
        from orchestrator.workflow.trace import Tracer

        if plain:
            Tracer.set_plain()
        install(app.runner)  # one line per finished run, cute or plain
    components = []
    if relay_file:
        from workers.assemble import relay_component

        components.append(relay_component(app, relay_file))
    sys.exit(run_async(serve(app, components=components), loop=loop))


def main() -> None:
    cli(prog_name="tokiwa-worker")


if __name__ == "__main__":
    main()
