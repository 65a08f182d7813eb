"""Put the worker process together: a relay inside a worker, bridged to the app's events.

With ``tokiwa-worker run --app … --relay relay.toml`` the relay's children exchange topic
messages as usual; a child that exits becomes a ``relay.task_exited`` event, and topics that
match the config's ``publish_events`` patterns become events of the topic's name (payload
``{"topic", "message"}``), so a relay line can trigger a workflow.

A relay that cannot go on (Redis refuses it: an ACL rule; or a background task keeps dying)
has logged one error line and stopped itself; the worker must not go on looking healthy.
:meth:`RelayComponent.wait_failed` returns the error for the worker's run loop to stop on
with a non-zero exit. If nothing waits on it, the component itself ends the process with
``FAILURE`` once the relay has stopped (in-flight events are then handed back by Redis's
visibility timeout instead of a graceful stop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import Any, cast

from orchestrator.app import Orchestrator
from orchestrator.cli import exitcodes
from workers.relay.config import load_relay_config
from workers.relay.core import Relay
from workers.relay.transport import RelayFatalError

log = logging.getLogger("tokiwa.worker")

OVERFLOW_POLL_S = 5.0  # how often a relay's overflow count is copied into Prometheus


class RelayComponent:
    """A relay started and stopped with the worker (``serve(..., components=[...])``)."""

    def __init__(self, app: Orchestrator, relay_file: str) -> None:
        self.app = app
        self.config = load_relay_config(relay_file)  # a broken file fails before anything starts
        self.relay: Relay | None = None
        self._overflow_task: asyncio.Task[Any] | None = None
        self._watch_task: asyncio.Task[Any] | None = None
        self._watched = False  # someone awaits wait_failed(): it stops the worker gracefully
        self._stopping = False

    async def _task_exited(self, info: Any) -> None:
        payload = dataclasses.asdict(cast(Any, info)) if dataclasses.is_dataclass(info) else dict(vars(info))
        await self.app.publish("relay.task_exited", payload, {"source": "relay"})

    async def _topic_event(self, topic: str, message: str) -> None:
        await self.app.publish(topic, {"topic": topic, "message": message}, {"source": "relay"})

    async def start(self) -> None:
        await self.app.connect()
        self.relay = Relay(self.config, redis_url=cast(str, self.app.redis_url),  # set once connected
                           namespace=self.app.settings.namespace,
                           on_task_exit=self._task_exited, on_topic_event=self._topic_event)
        await self.relay.start()
        self.app.hooks.extra_snapshots["relay"] = lambda: self.snapshot().get("counters", {})
        if self.app.hooks.event_observer is not None:  # metrics are on: export the overflow count
            self._overflow_task = asyncio.create_task(self._export_overflow())
        self._watch_task = asyncio.create_task(self._watch())

    async def wait_failed(self) -> RelayFatalError:
        """Wait until the relay cannot go on and return why (the relay has logged it). Whoever
        awaits this stops the worker (non-zero); never returns while the relay runs."""
        assert self.relay is not None  # noqa: S101 - called after start()
        self._watched = True
        return await self.relay.wait_failed()

    async def _watch(self) -> None:
        assert self.relay is not None  # noqa: S101
        await self.relay.wait_failed()
        await asyncio.sleep(0)  # let a waiter of wait_failed() see it first
        if self._watched or self._stopping:
            return
        await self.relay.stop()
        log.error("worker: exiting because its relay failed (exit code %d)", exitcodes.FAILURE)
        logging.shutdown()
        os._exit(exitcodes.FAILURE)

    async def _export_overflow(self) -> None:
        from orchestrator.ops import metrics

        reported = 0
        while True:
            await asyncio.sleep(OVERFLOW_POLL_S)
            total = int(self.snapshot().get("counters", {}).get("overflow", 0) or 0)
            if total > reported:
                metrics.observe_relay_overflow(total - reported)
                reported = total

    async def stop(self) -> None:
        self._stopping = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self._overflow_task is not None:
            self._overflow_task.cancel()
            await asyncio.gather(self._overflow_task, return_exceptions=True)
        if self.relay is not None:
            await self.relay.stop()

    def snapshot(self) -> dict[str, Any]:
        return self.relay.snapshot() if self.relay else {}


def relay_component(app: Orchestrator, relay_file: str) -> RelayComponent:
    return RelayComponent(app, relay_file)
