"""A test app: every processed event is counted in Redis so tests can find lost and duplicated
work. Behaviour is set by environment variables (read at import time in the worker process):

TEST_SLEEP_MS   handler sleeps this long (async)          default 0
TEST_FAIL       "always": the handler raises              default off
TEST_ONCE       "1": also subscribe a once=True handler
"""

from __future__ import annotations

import asyncio
import os

from orchestrator import Orchestrator

app = Orchestrator(mode="worker")
SLEEP_S = int(os.environ.get("TEST_SLEEP_MS", "0")) / 1000.0
FAIL = os.environ.get("TEST_FAIL") == "always"


def _key(name: str) -> str:
    return f"{app.settings.namespace}:test:{name}"


async def record(event) -> None:
    await app.redis.rpush(_key("started"), f"{event.payload['i']}:{os.getpid()}")
    if SLEEP_S:
        await asyncio.sleep(SLEEP_S)
    if FAIL:
        raise ValueError(f"handler refuses event {event.payload['i']}")
    if not await app.owns(event):  # lost it while frozen: another worker records it
        await app.redis.rpush(_key("stale"), f"{event.payload['i']}:{os.getpid()}")
        return
    pipe = app.redis.pipeline(transaction=False)
    pipe.hincrby(_key("seen"), str(event.payload["i"]), 1)
    pipe.hincrby(_key("by_pid"), str(os.getpid()), 1)
    await pipe.execute()


async def once_handler(event) -> None:
    await app.redis.rpush(_key("once"), f"{event.payload['i']}:{os.getpid()}")


app.dispatcher.subscribe("job", record)
if os.environ.get("TEST_ONCE") == "1":
    app.dispatcher.subscribe("job", once_handler, once=True, name="tests.once-handler")
