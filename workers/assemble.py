"""Put the worker process together: a relay inside a worker, bridged to the app's events.

With ``tokiwa-worker run --app … --relay relay.toml`` the relay's children exchange topic
messages as usual; a child that exits becomes a ``relay.task_exited`` event, and topics that
match the config's ``publish_events`` patterns become events of the topic's name (payload
``{"topic", "message"}``), so a relay line can trigger a workflow.

One worker per host runs the relay of a config (a lease per host and config), so
``--processes N`` or several replicas with ``--relay`` on one host run each relay task once;
the others stand by and take over when it stops or dies.

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
import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, cast

from orchestrator.app import Orchestrator
from orchestrator.cli import exitcodes
from orchestrator.leader import LeaderElector
from workers.relay.config import load_relay_config
from workers.relay.core import Relay
from workers.relay.transport import RelayFatalError

log = logging.getLogger("tokiwa.worker")

OVERFLOW_POLL_S = 5.0  # how often a relay's overflow count is copied into Prometheus
RELAY_LEASE_MS = 6_000  # a standing-by worker runs the relay within this after its holder died


def relay_role(relay_file: str) -> str:
    """The lease a relay of this config runs under on this host: one relay per host and
    config file content, whatever the number of worker processes (``--processes``) or
    replicas started with ``--relay`` there."""
    digest = hashlib.sha1(Path(relay_file).read_bytes()).hexdigest()[:12]  # noqa: S324 - a name, not security
    return f"relay:{socket.gethostname()}:{digest}"


class RelayComponent:
    """A relay started and stopped with the worker (``serve(..., components=[...])``), run by
    one worker per host: the workers that have the same relay config campaign for the lease
    :func:`relay_role`, the holder runs the relay, the others stand by and take over within
    the lease (``RELAY_LEASE_MS``) when it stops or dies."""

    def __init__(self, app: Orchestrator, relay_file: str) -> None:
        self.app = app
        self.config = load_relay_config(relay_file)  # a broken file fails before anything starts
        self.role = relay_role(relay_file)
        self.relay: Relay | None = None
        self.elector: LeaderElector | None = None
        self._overflow_task: asyncio.Task[Any] | None = None
        self._watch_task: asyncio.Task[Any] | None = None
        self._failed: asyncio.Future[RelayFatalError] | None = None
        self._watched = False  # someone awaits wait_failed(): it stops the worker gracefully
        self._stopping = False
        self._switch = asyncio.Lock()

    async def _task_exited(self, info: Any) -> None:
        payload = dataclasses.asdict(cast(Any, info)) if dataclasses.is_dataclass(info) else dict(vars(info))
        await self.app.publish("relay.task_exited", payload, {"source": "relay"})

    async def _topic_event(self, topic: str, message: str) -> None:
        await self.app.publish(topic, {"topic": topic, "message": message}, {"source": "relay"})

    async def start(self) -> None:
        await self.app.connect()
        self._failed = asyncio.get_running_loop().create_future()
        self.app.hooks.extra_snapshots["relay"] = lambda: self.snapshot().get("counters", {})
        self.elector = LeaderElector(cast(Any, self.app.redis), self.app.keys, self.role, ttl_ms=RELAY_LEASE_MS,
                                     on_elected=self._elected, on_demoted=self._demoted)
        if not await self.elector.try_acquire():
            holder = await self.elector.current_leader()
            log.info("a relay of this config already runs on this host (%s); standing by", holder)
        await self.elector.start()

    async def _elected(self, epoch: int) -> None:
        async with self._switch:
            if self.relay is not None or self._stopping:
                return
            self.relay = Relay(self.config, redis_url=cast(str, self.app.redis_url),  # set once connected
                               namespace=self.app.settings.namespace,
                               on_task_exit=self._task_exited, on_topic_event=self._topic_event)
            try:
                await self.relay.start()
            except Exception as exc:  # holding the lease without a relay would block the others
                log.error("the relay did not start (%s); stopping the worker", exc, exc_info=exc)
                self.relay = None
                if self._failed is not None and not self._failed.done():
                    self._failed.set_result(RelayFatalError(f"the relay did not start: {exc}"))
                return
            log.info("running the relay on this host (lease %s, epoch %d)", self.role, epoch)
            if self.app.hooks.event_observer is not None:  # metrics are on: export the overflow count
                self._overflow_task = asyncio.create_task(self._export_overflow())
            self._watch_task = asyncio.create_task(self._watch())

    async def _demoted(self) -> None:
        async with self._switch:
            if self.relay is None:
                return
            log.warning("lost the relay lease %s; stopping the relay (another worker takes over)", self.role)
            await self._stop_relay()

    async def wait_failed(self) -> RelayFatalError:
        """Wait until the relay cannot go on and return why (the relay has logged it). Whoever
        awaits this stops the worker (non-zero); never returns while the relay runs or stands by."""
        assert self._failed is not None  # noqa: S101 - called after start()
        self._watched = True
        return await self._failed

    async def _watch(self) -> None:
        relay = self.relay
        assert relay is not None and self._failed is not None  # noqa: S101
        error = await relay.wait_failed()
        if not self._failed.done():
            self._failed.set_result(error)
        await asyncio.sleep(0)  # let a waiter of wait_failed() see it first
        if self._watched or self._stopping:
            return
        await relay.stop()
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

    async def _stop_relay(self) -> None:
        for task in (self._watch_task, self._overflow_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._watch_task = self._overflow_task = None
        relay, self.relay = self.relay, None
        if relay is not None:
            await relay.stop()

    async def stop(self) -> None:
        self._stopping = True
        async with self._switch:
            await self._stop_relay()
        if self.elector is not None:
            await self.elector.stop()  # releases the lease: a standing-by worker takes over at once

    def snapshot(self) -> dict[str, Any]:
        return self.relay.snapshot() if self.relay else {}


def relay_component(app: Orchestrator, relay_file: str) -> RelayComponent:
    return RelayComponent(app, relay_file)
