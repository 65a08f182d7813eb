"""Test apps for chatflows and cron across real processes (not a test module).

``app`` (and :func:`build_app` for any mode) registers the chatflow ``chat-turns``, triggered
by ``chat.turn`` events whose payload is ``{"conversation": cid, "seq": i, "n": n}``. Each run:

- pushes ``<seq>|<pid>`` to ``{ns}:test:started:{cid}`` when it starts;
- folds the event into the conversation memory: ``memory["seq"]`` appends ``seq``,
  ``memory["sum"]`` adds ``n``;
- pushes JSON ``{seq, pid, start, end, event_id}`` (``time.time()``) to
  ``{ns}:test:runs:{cid}`` when its node ends, so a test can check overlap and order.

:func:`ticker` is a producer app (an app factory for ``--app ...chat:ticker``) with two
every-second cron jobs: ``tick`` records ``<slot>|<pid>`` to ``{ns}:test:fires`` per fire;
``beat`` publishes a ``cron.beat`` event. While it runs, it records every 100 ms which
processes believe they lead, in the set ``{ns}:test:leaders:<decisecond>``.

Environment (read when the app is built, i.e. at import time in a worker process):

TEST_SLEEP_MS              the chatflow node sleeps this long (ms)               default 0
TEST_SAVE_SLEEP_MS         after memory was saved (lock still held, event not
                           acked), the run pushes ``<seq>|<pid>`` to
                           ``{ns}:test:saved:{cid}`` and sleeps this long (ms)   default 0
TEST_LOCK_TTL_MS           conversation lock lease (``conversation_lock_ttl_ms``) default 30000
TEST_CRON_LEASE_MS         cron leader lease (``cron_lease_ms``)                  default 15000
TEST_CRON_POLICY           missed-slot policy of the ticker                      default latest
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from orchestrator import Node, Orchestrator, RedisConversationStore, Workflow
from orchestrator.chat.conversations import ConversationStore
from orchestrator.cron.expr import slot_iso
from orchestrator.locks import cancel_and_wait

EVENT_TYPE = "chat.turn"
WORKFLOW = "chat-turns"


def _env_ms(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def tkey(app: Orchestrator, name: str, *parts: str) -> str:
    return ":".join([app.settings.namespace, "test", name, *parts])


class SlowSaveStore(ConversationStore):
    """The Redis store, plus a pause right after a successful write: a test kills the worker
    there, after the memory delta is saved but before the lock is released and the event acked."""

    def __init__(self, app: Orchestrator, pause_s: float) -> None:
        self.app, self.pause_s = app, pause_s
        self._inner: RedisConversationStore | None = None

    @property
    def inner(self) -> RedisConversationStore:
        if self._inner is None:
            self._inner = RedisConversationStore(self.app.redis, self.app.keys)
        return self._inner

    async def get(self, conversation_id: str) -> dict[str, Any]:
        return await self.inner.get(conversation_id)

    async def set(self, conversation_id: str, memory: dict[str, Any], **options: Any) -> bool:
        return await self.inner.set(conversation_id, memory, **options)

    async def delete(self, conversation_id: str) -> bool:
        return await self.inner.delete(conversation_id)

    async def apply_delta(self, conversation_id: str, patch: dict[str, Any], **options: Any) -> bool:
        applied = await self.inner.apply_delta(conversation_id, patch, **options)
        seq = (patch.get("set") or {}).get("seq", ["?"])[-1]
        await self.app.redis.rpush(tkey(self.app, "saved", conversation_id), f"{seq}|{os.getpid()}")
        await asyncio.sleep(self.pause_s)
        return applied


def build_app(mode: str = "worker", **options: Any) -> Orchestrator:
    """The chatflow app in ``mode``; ``options`` go to the Orchestrator (redis_url, namespace ...)."""
    save_sleep_s = _env_ms("TEST_SAVE_SLEEP_MS", 0) / 1000
    app = Orchestrator(mode=mode, conversation_lock_ttl_ms=_env_ms("TEST_LOCK_TTL_MS", 30_000), **options)
    if save_sleep_s:
        app.conversation_store = SlowSaveStore(app, save_sleep_s)
    sleep_s = _env_ms("TEST_SLEEP_MS", 0) / 1000

    async def turn(ctx) -> dict[str, Any]:
        start = time.time()
        cid, seq = ctx.conversation_id, ctx.input["seq"]
        await app.redis.rpush(tkey(app, "started", cid), f"{seq}|{os.getpid()}")
        if sleep_s:
            await asyncio.sleep(sleep_s)
        ctx.update_memory({"seq": [*ctx.memory.get("seq", []), seq],
                           "sum": ctx.memory.get("sum", 0) + ctx.input["n"]})
        record = {"seq": seq, "pid": os.getpid(), "start": start, "end": time.time(), "event_id": ctx.event.id}
        await app.redis.rpush(tkey(app, "runs", cid), json.dumps(record))
        return record

    chatflow = Workflow(name=WORKFLOW, type="chatflow", nodes=[Node(name="turn", handler=turn)])
    app.register_workflow(chatflow, trigger={
        "type": "event", "event_type": EVENT_TYPE,
        "map_conversation_id": lambda event: event.payload["conversation"],
    })
    return app


app = build_app("worker")


class LeaderProbe:
    """Records, every 100 ms, whether this process believes it leads cron (an app lifecycle
    component: started after the app's cron registry, stopped before it)."""

    def __init__(self, app: Orchestrator, interval_s: float = 0.05) -> None:
        self.app, self.interval_s = app, interval_s
        self._task: asyncio.Task | None = None

    async def _loop(self) -> None:
        while True:
            elector = self.app.cron.elector
            if elector is not None and elector.is_leader:
                bucket = tkey(self.app, "leaders", str(int(time.time() * 10)))
                await self.app.redis.sadd(bucket, f"{os.getpid()}")
                await self.app.redis.expire(bucket, 300)
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="test-leader-probe")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)  # a plain cancel can be swallowed inside a Redis call


def ticker() -> Orchestrator:
    """The cron producer app (see the module docstring)."""
    cron_app = Orchestrator(mode="producer", cron_tz="UTC",
                            cron_lease_ms=_env_ms("TEST_CRON_LEASE_MS", 15_000),
                            cron_missed_policy=os.environ.get("TEST_CRON_POLICY", "latest"))

    async def tick(job_name: str, slot: Any) -> None:
        await cron_app.redis.rpush(tkey(cron_app, "fires"), f"{slot_iso(slot)}|{os.getpid()}")

    cron_app.register_cron_job("* * * * * *", "tick", tick)
    cron_app.register_cron_event("* * * * * *", "cron.beat", name="beat", payload={"from": "ticker"})
    cron_app.add_lifecycle(LeaderProbe(cron_app))
    return cron_app
