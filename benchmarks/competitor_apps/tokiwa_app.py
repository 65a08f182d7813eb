"""tokiwa: ``python -m workers.cli run --app benchmarks.competitor_apps.tokiwa_app:app``.

The same one-``INCR`` no-op as the competitors' tasks (``benchmarks.apps:noop`` does no Redis call).
"""

from __future__ import annotations

from orchestrator import Orchestrator

from . import COUNTER

app = Orchestrator(mode="worker")


async def _noop(event) -> None:
    await app.redis.incr(COUNTER)


app.dispatcher.subscribe("bench.noop", _noop)
