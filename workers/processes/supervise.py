"""``tokiwa-worker run --processes P``: supervise P worker processes on this host.

Each child is ``python -m workers.cli run`` with the same options minus ``--processes`` and
``--metrics-port``. A child that dies is restarted with exponential backoff; SIGTERM / Ctrl+C
is passed to every child, which finish their in-flight work within the grace period.

Metrics: children share one ``PROMETHEUS_MULTIPROC_DIR`` (``$TOKIWA_STATE_DIR/prometheus-<pid>``
unless set) and the supervisor alone serves ``/metrics`` on ``--metrics-port``, so one scrape
shows the whole host.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from workers.processes.supervisor import Supervisor, child_run_argv, without_option


def supervise_cli(argv: Sequence[str], processes: int, *, metrics_port: int | None = None,
                  metrics_host: str = "127.0.0.1") -> int:
    """Run the supervisor for the ``run`` command line ``argv`` (sys.argv); returns an exit code."""
    from orchestrator.config import load_settings

    args = list(argv)
    run_args = args[args.index("run") + 1:] if "run" in args else args[1:]
    run_args = without_option(run_args, "--metrics-port")
    settings = load_settings({})
    env = dict(os.environ)
    metrics_dir = env.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_port is not None:
        from orchestrator.ops import metrics

        metrics_dir = metrics_dir or str(settings.state_dir / f"prometheus-{os.getpid()}")
        metrics.prepare_multiprocess_dir(metrics_dir)
        env["PROMETHEUS_MULTIPROC_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    supervisor = Supervisor(lambda slot: child_run_argv(run_args), processes=processes, env=env,
                            grace_period_s=settings.grace_period_s + 5)
    return asyncio.run(_serve(supervisor, metrics_port, metrics_host))


async def _serve(supervisor: Supervisor, metrics_port: int | None, metrics_host: str) -> int:
    server = None
    if metrics_port is not None:
        from orchestrator.ops.http_api import MetricsServer

        server = MetricsServer(None, metrics_host, metrics_port)
        await server.start()
    try:
        return await supervisor.run()
    finally:
        if server is not None:
            await server.stop()
