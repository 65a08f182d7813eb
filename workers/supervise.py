"""``tokiwa-worker run --processes P``: supervise P worker processes on this host.

Each child is ``python -m workers.cli run`` with the same options minus ``--processes``.
A child that dies is restarted with exponential backoff; SIGTERM / Ctrl+C is passed to every
child, which finish their in-flight work within the grace period. Children share one
``PROMETHEUS_MULTIPROC_DIR`` (created under the state dir when not set) so one scrape of the
metrics port shows them all.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

from .supervisor import Supervisor, child_run_argv


def supervise_cli(argv: Sequence[str], processes: int) -> int:
    """Run the supervisor for the ``run`` command line ``argv`` (sys.argv); returns an exit code."""
    args = list(argv)
    run_args = args[args.index("run") + 1:] if "run" in args else args[1:]
    env = dict(os.environ)
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="tokiwa-metrics-")
    from orchestrator.config import load_settings

    grace = load_settings({}).grace_period_s
    supervisor = Supervisor(lambda slot: child_run_argv(run_args), processes=processes, env=env,
                            grace_period_s=grace + 5)
    return supervisor.run_sync()
