"""A test app that records the module of the event loop its handler runs on, under
``{ns}:test:loop`` (the worker's ``--loop`` choice, seen from inside)."""

from __future__ import annotations

import asyncio

from orchestrator import Orchestrator

app = Orchestrator(mode="worker")


async def record_loop(event) -> None:
    await app.redis.set(f"{app.settings.namespace}:test:loop", type(asyncio.get_running_loop()).__module__)


app.dispatcher.subscribe("loop.which", record_loop, name="loop.which")
