"""Run an Orchestrator as a long-lived process (worker or producer): signals, heartbeat.

The runner owns the signals: the first SIGTERM / SIGINT stops fetching and lets in-flight
work finish within the grace period (then hands the rest back) and exits 0; a second one
exits at once with ``FORCED``. Nothing acked is lost either way: acks happen only after work
is done, and unacked entries are reclaimed by other workers.

Start-up: a URL's Redis is asked once (:func:`check_redis`) before the app starts, so what
waiting cannot mend (a refused password or ACL, a TLS failure) stops the command at once
with one line; an unreachable Redis is waited out by a worker (one warning line per outage)
and ends a producer with exit 69. A signal while the app starts stops it: exit 0.

A worker writes a heartbeat to ``{ns}:workers`` every ``heartbeat_interval_s`` and removes
it on a clean exit; entries older than 3 intervals are pruned by any live worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any, cast

import msgpack
import redis.asyncio as aioredis

from orchestrator import faults
from orchestrator.app import Orchestrator
from orchestrator.cli import exitcodes
from orchestrator.faults import Fault
from orchestrator.locks import cancel_and_wait
from orchestrator.ops.heartbeats import STALE_HEARTBEATS, worker_beats

log = logging.getLogger("tokiwa.worker")

#: exit codes of start-up errors that no retry mends (the command stops with its line)
PERMANENT = frozenset({exitcodes.NOPERM, exitcodes.PROTOCOL, exitcodes.USAGE})


async def check_redis(app: Orchestrator) -> None:
    """PING the app's Redis once (on a URL; the embedded server is started by the app) and
    raise the error when it is one that waiting does not mend: a refused password, an ACL
    rule, a TLS failure, a missing certificate file."""
    from orchestrator.broker.connection import create_redis
    from orchestrator.cli.producer import explain

    url = app.settings.redis_url
    if url is None:
        return
    # one plain attempt, outside the fault model's bookkeeping: an outage is the app's to report
    client = create_redis(url, timeout_ms=app.settings.redis_timeout_ms, retries=0, counted=False)
    try:
        await client.ping()
    except Exception as exc:
        if explain(exc).code in PERMANENT:
            raise
    finally:
        await client.aclose()



class Heartbeat:
    """Writes this worker's heartbeat into ``{ns}:workers``."""

    def __init__(self, app: Orchestrator, extra: dict[str, Any] | None = None) -> None:
        self.app = app
        self.extra = extra or {}
        self.started = time.time()
        self._task: asyncio.Task[Any] | None = None

    @property
    def _redis(self) -> aioredis.Redis:
        return cast(aioredis.Redis, self.app.redis)  # the heartbeat runs on a connected app

    def payload(self) -> bytes:
        consumer = self.app.consumer
        stats = consumer.stats if consumer else None
        blob: bytes = msgpack.packb({
            "id": self.app.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "mode": self.app.mode,
            "started": self.started,
            "last_seen": time.time(),
            "in_flight": consumer.in_flight_count if consumer else 0,
            "processed": stats.processed if stats else 0,
            "failed": stats.failed if stats else 0,
            "concurrency": self.app.settings.concurrency,
            # what this worker can run: callers without the code read it (call by name)
            "workflows": sorted(r.workflow.name for r in self.app.workflows.registrations),
            "groups": consumer.groups if consumer else [],
            **self.extra,
        })
        return blob

    async def beat(self) -> None:
        keys = self.app.keys
        await self._redis.hset(keys.workers, self.app.worker_id, self.payload())
        await self._prune()

    async def _prune(self) -> None:
        limit_s = STALE_HEARTBEATS * self.app.settings.heartbeat_interval_s
        entries = cast("dict[bytes, bytes]", await self._redis.hgetall(self.app.keys.workers))  # bytes replies
        stale = [w.key for w in worker_beats(entries, now=time.time(), stale_after_s=limit_s) if w.stale]
        if stale:
            await self._redis.hdel(self.app.keys.workers, *stale)

    async def _loop(self) -> None:
        """Beat every interval. Transient Redis faults (unreachable, full, failing over) are
        logged once per episode by the fault model and the beat is tried again; anything else
        is logged with its traceback each time (the worker goes on: a missing heartbeat makes
        it look dead, never healthy)."""
        while True:
            await self.beat_once()
            await asyncio.sleep(self.app.settings.heartbeat_interval_s)

    async def beat_once(self) -> bool:
        """One beat; a failure is handled as :meth:`_loop` says. Returns whether it was written."""
        try:
            await self.beat()
            faults.recovered(Fault.OOM, Fault.FAILOVER)  # a write went through
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if faults.classify(exc) in faults.TRANSIENT:
                faults.report(exc)
            else:
                log.exception("heartbeat failed")
            return False

    async def start(self) -> None:
        """Write the first beat (so a worker that says it runs is registered), then beat on in
        a task; the first interval's wait replaces the loop's first beat."""
        await self.beat_once()

        async def later() -> None:
            await asyncio.sleep(self.app.settings.heartbeat_interval_s)
            await self._loop()

        self._task = asyncio.create_task(later(), name="tokiwa-heartbeat")

    async def stop(self) -> None:
        if self._task:
            await cancel_and_wait(self._task)
            self._task = None
        try:
            await self._redis.hdel(self.app.keys.workers, self.app.worker_id)
        except Exception as exc:
            log.warning("could not remove heartbeat: %s", faults.describe(exc))


class SignalStop:
    """First signal sets ``event``; the second exits the process at once."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.count = 0

    def _handle(self, signum: int) -> None:
        self.count += 1
        if self.count == 1:
            log.info("received %s: finishing in-flight work (send again to exit at once)",
                     signal.Signals(signum).name)
            self.event.set()
        else:
            log.warning("second signal: exiting now")
            os._exit(exitcodes.FORCED)

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._handle, sig)

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _start(app: Orchestrator) -> None:
    await check_redis(app)
    await app.start()


async def serve(app: Orchestrator, *, components: list[Any] | None = None, heartbeat: bool = True) -> int:
    """Start ``app`` (plus extra ``components`` with start/stop), run until a signal or a fatal
    error, then stop gracefully. Returns an exit code."""
    stopper = SignalStop()
    stopper.install()
    beat = None
    try:
        starting = asyncio.create_task(_start(app), name="tokiwa-start")
        stop_wait = asyncio.create_task(stopper.event.wait())
        await asyncio.wait([starting, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if not starting.done():  # a signal while Redis is waited for: nothing runs yet
            await cancel_and_wait(starting)
            log.info("%s stopped before it finished starting", app.mode)
            return exitcodes.OK
        starting.result()  # a start-up error ends the command (one line, its exit code)
        for component in components or []:
            await component.start()
        if heartbeat:
            beat = Heartbeat(app)
            await beat.start()
        log.info("%s %s running (namespace %s, concurrency %d)", app.mode, app.worker_id,
                 app.settings.namespace, app.settings.concurrency)
        waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stopper.event.wait())]
        if app._consume_task is not None:
            waiters.append(app._consume_task)
        # a component that can fail for good (a relay refused by an ACL) says so through
        # wait_failed(); that stops the worker gracefully with a non-zero exit
        failed = [asyncio.create_task(c.wait_failed(), name=f"tokiwa-watch-{type(c).__name__}")
                  for c in components or [] if hasattr(c, "wait_failed")]
        done, _ = await asyncio.wait(waiters + failed, return_when=asyncio.FIRST_COMPLETED)
        code = exitcodes.OK
        for task in done:
            if task in failed:
                # the component logged why; say only what happens now
                log.error("stopping the worker: %s failed (%s)", task.get_name().removeprefix("tokiwa-watch-"),
                          type(task.result()).__name__)
                code = exitcodes.FAILURE
            elif task is not waiters[0] and task.exception() is not None:
                log.error("consumer stopped with an error: %r", task.exception())
                code = exitcodes.FAILURE
        for task in [waiters[0], *failed]:
            task.cancel()
        return code
    finally:
        for component in reversed(components or []):
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %r failed", component)
        try:
            await app.stop()
        finally:
            if beat is not None:
                await beat.stop()
            await app.close()
            stopper.remove()
