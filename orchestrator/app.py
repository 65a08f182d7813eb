"""The Orchestrator: the object a user builds, and both CLIs load (``--app pkg.module:app``).

A facade: it builds the parts, holds what they share (settings, the Redis client, the run
store, the :class:`AppHooks`) and delegates to them. Each part is given only what it uses,
as a Protocol the part declares: the workflow registry a
:class:`~orchestrator.runs.registry.RunsHost` (and the consumer's ownership rule), the cron
registry a :class:`~orchestrator.cron.jobs.CronHost`, observability an
:class:`~orchestrator.ops.observability.ObservedApp`. Between the layers travel typed values:
a processor's :class:`~orchestrator.runs.outcome.ProcessResult`, the consumer's
:class:`~orchestrator.broker.consumer.Outcome`.

Modes: ``all`` (publish, consume, run cron), ``producer`` (publish and cron, never consume)
and ``worker`` (consume, never run cron). Processing is continuous: a worker consumes the
stream until stopped, unlike upstream tokiwa's push-driven queue (SEED-SEMANTICS §2.6).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from orchestrator import faults
from orchestrator.broker.consumer import Consumer, Outcome, SlotShare
from orchestrator.broker.delayed import IDLE_POLL_MS, DelayedEvents, DelayMover, due_ms
from orchestrator.broker.groups import ConsumerGroups
from orchestrator.broker.session import BrokerSession
from orchestrator.broker.streams import StreamBroker
from orchestrator.chat.chatflow import ChatflowExecutor
from orchestrator.config import Settings, load_settings
from orchestrator.cron.jobs import CronRegistry
from orchestrator.dispatcher import EventDispatcher
from orchestrator.errors import InvalidArgumentError, StateError
from orchestrator.events import IDEMPOTENT_PREFIX, Event, build_event
from orchestrator.keys import Keys
from orchestrator.locks import claim_once
from orchestrator.ops.snapshot import app_snapshot, registered_workers
from orchestrator.runs.fleet import Fleet
from orchestrator.runs.limits import Gate
from orchestrator.runs.outcome import OK, ProcessResult, Verdict
from orchestrator.runs.recorder import ErrorHook
from orchestrator.runs.registry import RunServices, RunTarget, WorkflowRegistry
from orchestrator.runs.routes import Route, advert_matches
from orchestrator.runs.stores import InMemoryRunStore, RedisRunStore, RunStore
from orchestrator.topics import encode_topic_frame
from orchestrator.workflow.runner import Runner

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from orchestrator.broker.sync_publish import SyncPublisher
    from orchestrator.workflow.model import Workflow
    from orchestrator.workflow.result import WorkflowRunResult

log = logging.getLogger("tokiwa")

RESERVED_PREFIX = "tokiwa."
Mode = Literal["all", "producer", "worker"]
#: a step run for every consumed event after the dispatcher (``add_processor``)
EventProcessor = Callable[[Event], Awaitable[ProcessResult]]


@dataclass(slots=True)
class AppHooks:
    """The app's extension points, in one place. Each is optional; a failing error hook is
    logged, never fatal. ``Orchestrator(on_workflow_error=..., on_run_store_error=...)`` sets
    the first two; observability installs ``event_observer`` and ``on_cron_leadership``."""

    #: ``fn(exc, {"workflow_id", "event", "trigger"})`` when a triggered workflow could not run
    #: at all (a chatflow without a conversation id, a lock not had in time); may be async
    on_workflow_error: ErrorHook | None = None
    #: ``fn(exc, record)`` when the run store could not save a run record; the event is then
    #: acked anyway (without this hook the event fails); may be async
    on_run_store_error: ErrorHook | None = None
    #: ``fn(event_type, outcome)`` with outcome ok / failed / dead, for every consumed event
    event_observer: Callable[[str, str], None] | None = None
    #: ``fn(leading)`` when this process gains (True) or loses (False) cron leadership
    on_cron_leadership: Callable[[bool], Any] | None = None
    #: ``fn()`` when a chatflow turn arrives that its publisher could not order (no key)
    on_unordered: Callable[[], Any] | None = None
    #: ``fn()`` when an event waits for a route's rate or concurrency limit
    on_limit_wait: Callable[[], Any] | None = None
    #: name -> fn() giving more ``snapshot()`` sections (the relay adds its counters)
    extra_snapshots: dict[str, Callable[[], Any]] = field(default_factory=dict)


class Orchestrator:
    """Publish events, consume them on workers, run subscribers and triggered workflows.

    >>> app = Orchestrator(redis_url="redis://localhost:6379/0", max_concurrent_events=2)
    >>> app.dispatcher.subscribe("order.created", on_order)          # doctest: +SKIP
    >>> await app.publish("order.created", {"order_ref": "A-001"})  # doctest: +SKIP
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        mode: Mode = "all",
        max_concurrent_events: int | None = None,
        ack_policy: Literal["always", "on_success"] | None = None,
        namespace: str | None = None,
        settings: Settings | None = None,
        on_workflow_error: ErrorHook | None = None,
        source: str | None = None,
        workflow_concurrency: int | None = None,
        run_store: RunStore | None = None,
        on_run_store_error: ErrorHook | None = None,
        conversation_store: Any = None,
        runner: Runner | None = None,
        artifacts_dir: str | None = None,
        cron_tz: str | None = None,
        cron_lease_ms: int | None = None,
        cron_missed_policy: str | None = None,
        conversation_lock_ttl_ms: int = 30_000,
        **overrides: Any,
    ) -> None:
        if mode not in ("all", "producer", "worker"):
            raise InvalidArgumentError(f"mode must be 'all', 'producer' or 'worker', got {mode!r}")
        given = {
            "redis_url": redis_url,
            "concurrency": max_concurrent_events,
            "ack_policy": ack_policy,
            "namespace": namespace,
            **overrides,
        }
        self._explicit = {k: v for k, v in given.items() if v is not None}
        self.settings = settings or load_settings(base=self._explicit)
        self.mode: Mode = mode
        self.dispatcher = EventDispatcher()
        self.hooks = AppHooks(on_workflow_error=on_workflow_error, on_run_store_error=on_run_store_error)
        self.source = source
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._session = BrokerSession()  # the Redis client and the broker, once connected
        self.consumer: ConsumerGroups | None = None
        self._processors: list[EventProcessor] = []
        self._extra_processors: list[EventProcessor] = []  # add_processor's, each its own route
        self._lifecycle: list[Any] = []  # objects with async start()/stop() run with the app
        self._consume_task: asyncio.Task[None] | None = None
        self._started = False
        self._sync_publisher: SyncPublisher | None = None
        self._observability_on = False
        self.metrics = {"published": 0, "processed": 0, "failed": 0, "dispatch_errors": 0, "delayed": 0}
        self._delayed: DelayedEvents | None = None
        self.delay_mover: DelayMover | None = None  # moves due delayed events (worker / all mode)
        self.runner = runner or Runner()
        self.run_store: RunStore = run_store or InMemoryRunStore()
        self._run_store_given = run_store is not None
        self.conversation_store = conversation_store
        self.conversation_lock_ttl_ms = conversation_lock_ttl_ms
        self._artifacts_dir = artifacts_dir
        self._artifact_store: Any = None
        self._chatflows: ChatflowExecutor | None = None
        self.workflows = WorkflowRegistry(self, self._owned_entries, workflow_concurrency=workflow_concurrency)
        self._processors.append(self.workflows.process)
        self.fleet = Fleet(self, self._subscriber_step, self._extra_processors)
        # cron_* given here count where the settings (cron_tz, cron_lease_ms, cron_missed_policy) leave them unset
        self.cron = CronRegistry(self, tz=cron_tz, lease_ms=cron_lease_ms, missed_policy=cron_missed_policy)
        self.add_lifecycle(self.cron)
        from orchestrator.runs.cancel import CancelWatcher

        # cancel requests for the runs running here (no Redis call while none runs); a watcher
        # that fails for good stops the consumers, so the worker exits non-zero
        self.cancel_watcher = CancelWatcher.for_app(self, on_failure=self._component_failed)
        self.add_lifecycle(self.cancel_watcher)

    # -- configuration -------------------------------------------------------------------
    def configure(self, *, config_file: str | None = None, **values: Any) -> None:
        """Re-apply settings (used by the CLIs): flags (``values``) > ``TOKIWA_*`` env > TOML >
        the app's own constructor arguments > defaults."""
        self.settings = load_settings(values, base=self._explicit, config_file=config_file)

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.namespace)

    @property
    def max_concurrent_events(self) -> int:
        return self.settings.concurrency

    def add_processor(self, processor: EventProcessor) -> None:
        """Add a step run for every consumed event after the dispatcher and the workflows. It
        returns a :class:`~orchestrator.runs.outcome.ProcessResult`; on workers it is a route of
        its own (``proc:{qualified name}``) with its own delivery state."""
        self._processors.append(processor)
        self._extra_processors.append(processor)

    # -- routes (orchestrator.runs.fleet) ---------------------------------------------------
    def routes(self) -> list[Route]:
        """This app's routes (see :mod:`orchestrator.runs.routes`): one per subscriber, per
        registered workflow and per added processor, each read through its own group."""
        return self.fleet.routes()

    def _subscriber_step(self, sub: Any) -> Callable[[Event], Awaitable[ProcessResult]]:
        async def step(event: Event) -> ProcessResult:
            if event.type.startswith(RESERVED_PREFIX):
                return OK
            return self._dispatch_verdict(await self.dispatcher.dispatch_to(sub.id, event))
        return step

    def route_groups(self) -> list[str]:
        """The consumer group of each of this app's routes."""
        return self.fleet.groups()

    async def declare_routes(self) -> list[str]:
        """Create the groups of this app's routes that Redis lacks and write the routes'
        adverts to ``{ns}:routes``; returns the groups created."""
        return await self.fleet.declare()

    async def remote_workflow(self, ref: str) -> RunTarget:
        """A workflow this app does not register, by name or id, from the routes workers declared."""
        return await self.fleet.remote_workflow(ref)

    def add_lifecycle(self, component: Any) -> None:
        """Start/stop ``component`` with the app (``async start()``, ``async stop()``)."""
        self._lifecycle.append(component)

    # -- connection ----------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect to Redis (starting an embedded redis-server if no URL is set) and create the
        consumer group. Called by ``start()`` and ``publish()`` as needed; idempotent."""
        if self.broker is not None:
            return
        consumer = self.worker_id if self.mode != "producer" else f"producer-{self.worker_id}"
        await self._session.open(self.settings, consumer, routes=len(self.routes()))
        redis = self._session.client()
        from orchestrator.broker.partitions import check_layout

        def layout() -> Awaitable[int]:
            return check_layout(redis, self.keys, self.settings.partitions)

        if self.mode == "worker":  # a worker waits out an unreachable or full Redis
            await faults.retry_transient(layout)
            await faults.retry_transient(self.declare_routes)
        else:
            await layout()
            await self.declare_routes()

        async def claim_once_cluster_wide(name: str) -> bool:
            # a resent claim that finds our own id counts as ours (see locks.claim_once)
            return await claim_once(redis, self.keys.once(name), self.worker_id)

        self.dispatcher.once_claim = claim_once_cluster_wide
        if not self._run_store_given:
            self.run_store = RedisRunStore(redis, self.keys, retention_s=self.settings.run_retention_s,
                                           max_records=self.settings.run_records_max)
        if self.conversation_store is None:
            from orchestrator.chat.conversations import RedisConversationStore

            self.conversation_store = RedisConversationStore(redis, self.keys, ttl_s=self.settings.conversation_ttl_s)

    @property
    def redis(self) -> aioredis.Redis | None:
        """The asyncio Redis client; None until ``connect()`` and after ``close()``."""
        return self._session.redis

    @property
    def shared_redis(self) -> Any:
        """An :class:`~orchestrator.broker.autopipe.AutoPipeline` on the app's client, one per
        client: the commands that concurrent handlers issue through it in one loop tick go to
        Redis as one pipeline (docs/performance.md). StateError before ``connect()``."""
        from orchestrator.broker.autopipe import shared_pipeline

        if (redis := self._session.redis) is None:
            raise StateError("shared_redis needs a Redis connection: call connect() or start() first")
        return shared_pipeline(redis)

    @property
    def broker(self) -> StreamBroker | None:
        """The stream broker on that client; None until ``connect()`` and after ``close()``."""
        return self._session.broker

    @property
    def redis_url(self) -> str | None:
        return self._session.embedded_url or self.settings.redis_url

    async def close(self) -> None:
        """Close the Redis connections and stop an embedded server. Idempotent."""
        if self._sync_publisher is not None:
            self._sync_publisher.close()
            self._sync_publisher = None
        await self._session.close()

    # -- publishing -----------------------------------------------------------------------
    async def publish(self, type: str, payload: Any = None, metadata: Mapping[str, Any] | None = None,  # noqa: A002
                      *, key: str | None = None, idempotency_key: str | None = None,
                      delay_s: float | None = None, at: datetime | None = None) -> Event:
        """Build an event, add it to the stream, and return it (with ``stream_id`` set).

        ``key`` orders the event: chatflows that declare no conversation key take it as the
        conversation id. ``idempotency_key``: the event's id is derived from it, and a second
        publish with the same key within ``idempotency_window_s`` adds nothing (the handlers
        and workflows run once). ``delay_s`` / ``at`` (an aware datetime, or naive = local
        time): the event waits in Redis (``{ns}:delayed``) and a worker adds it to the stream
        when it is due (``stream_id`` stays None until then; ``inspect delayed`` lists and
        cancels it)."""
        event = self._build(type, payload, metadata, key, idempotency_key)
        if delay_s is None and at is None:
            await self.enqueue(event)
            return event
        await self.schedule(event, due_ms(delay_s=delay_s, at=at))
        return event

    async def schedule(self, event: Event, due_at_ms: int) -> bool:
        """Add ``event`` to the delayed events, due at ``due_at_ms`` (epoch ms, this host's
        clock). Its conversation order is taken when it is moved to the stream. False when an
        event of that id is already scheduled."""
        await self.connect()
        where = await self.fleet.placement(event)
        added = await self.delayed().schedule(event, due_at_ms, where.order_lists, partition=where.partition)
        if added:
            self.metrics["delayed"] += 1
        return added

    def delayed(self) -> DelayedEvents:
        """The delayed events of this namespace (after ``connect()``)."""
        if self._delayed is None or self._delayed.keys != self.keys:
            self._delayed = DelayedEvents(self._session.client(), self.keys, self.settings)
        return self._delayed

    def _build(self, type: str, payload: Any, metadata: Mapping[str, Any] | None,  # noqa: A002
               key: str | None, idempotency_key: str | None) -> Event:
        return build_event(type, payload, self._with_source(metadata), key=key, idempotency_key=idempotency_key,
                           namespace=self.settings.namespace)

    async def enqueue(self, event: Event) -> str:
        """Add an already built event to the stream; returns its stream id. The same event id
        published again within ``publish_dedup_ms`` (``idempotency_window_s`` for an id made
        from an idempotency key) adds nothing and returns the first stream id."""
        await self.connect()
        where = await self.fleet.placement(event)
        stream_id = await self._session.stream_broker().publish(event, order_lists=where.order_lists,
                                                                dedup_ms=self._dedup_ms(event),
                                                                partition=where.partition)
        self.metrics["published"] += 1
        return stream_id

    async def publish_many(self, events: Iterable[Event]) -> list[str]:
        """Add many events in one pipelined round trip."""
        await self.connect()
        events = list(events)
        where = [await self.fleet.placement(e) for e in events]
        lists = [w.order_lists for w in where]
        ids = await self._session.stream_broker().publish_many(events, order_lists=lists if any(lists) else None,
                                                               partitions=[w.partition for w in where])
        self.metrics["published"] += len(ids)
        return ids

    def publish_sync(self, type: str, payload: Any = None,  # noqa: A002
                     metadata: Mapping[str, Any] | None = None, *, key: str | None = None,
                     idempotency_key: str | None = None) -> Event:
        """``publish`` for synchronous code (web views, scripts): same wire form and checks,
        redis-py's sync client. Needs ``redis_url``. Thread-safe."""
        event = self._build(type, payload, metadata, key, idempotency_key)
        sync = self._sync()
        where = self.fleet.placement_now(event, self.fleet.book.refresh_sync(sync.redis))
        sync.publish(event, where.order_lists, dedup_ms=self._dedup_ms(event), partition=where.partition)
        self.metrics["published"] += 1
        return event

    def publish_many_sync(self, events: Iterable[Event]) -> list[str]:
        """``publish_many`` for synchronous code: one pipelined round trip."""
        events = list(events)
        sync = self._sync()
        adverts = self.fleet.book.refresh_sync(sync.redis)
        where = [self.fleet.placement_now(e, adverts) for e in events]
        ids = sync.publish_many(events, [w.order_lists for w in where], [w.partition for w in where])
        self.metrics["published"] += len(ids)
        return ids

    def _dedup_ms(self, event: Event) -> int | None:
        """The publish-once window of ``event``: the idempotency window for an id derived from
        an idempotency key, else None (``publish_dedup_ms``)."""
        if event.id.startswith(IDEMPOTENT_PREFIX):
            return int(self.settings.idempotency_window_s * 1000)
        return None

    def _sync(self) -> SyncPublisher:
        if self._sync_publisher is None:
            from orchestrator.broker.sync_publish import SyncPublisher

            self._sync_publisher = SyncPublisher(self.settings)
        return self._sync_publisher

    def _with_source(self, metadata: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        if self.source and (metadata is None or not metadata.get("source")):
            return {**(metadata or {}), "source": self.source}
        return metadata

    # -- processing -----------------------------------------------------------------------
    async def process_event(self, event: Event) -> Outcome:
        """Run the dispatcher, then every processor (triggered workflows) for one event.
        Event types starting with ``tokiwa.`` are reserved and skip the dispatcher."""
        steps = [] if event.type.startswith(RESERVED_PREFIX) else [await self._dispatch(event)]
        for processor in self._processors:
            steps.append(await processor(event))
        return self._outcome(event, ProcessResult.combine(steps))

    def _route_process(self, route: Route) -> Callable[[Event], Awaitable[Outcome]]:
        """What a route's consumer runs per event."""
        async def process(event: Event) -> Outcome:
            return self._outcome(event, await route.process(event))
        return process

    def _outcome(self, event: Event, result: ProcessResult) -> Outcome:
        if result.ok:
            self.metrics["processed"] += 1
            return Outcome(True)
        self.metrics["failed"] += 1
        if result.traceback:
            log.debug("event %s (%s) failed: %s\n%s", event.id, event.type, result.error, result.traceback)
        return Outcome(False, result.error[:4000], retry=result.verdict.redo)

    async def _dispatch(self, event: Event) -> ProcessResult:
        """The subscribers' step of ``process_event``."""
        return self._dispatch_verdict(await self.dispatcher.dispatch(event))

    def _dispatch_verdict(self, result: Any) -> ProcessResult:
        """What a dispatch came to. A subscriber that met a transient Redis fault retries the
        event (the event did not fail), whatever ack_policy says."""
        event = result.event
        if not result.errors:
            return OK
        self.metrics["dispatch_errors"] += len(result.errors)
        for e in result.errors:
            log.warning("subscriber %s failed on %s (%s): %r", e.name, event.type, e.stage, e.error)
        infra = any(faults.is_transient(e.error) for e in result.errors)
        return ProcessResult(Verdict.RETRY_LATER if infra else Verdict.FAILED,
                             "; ".join(f"{e.stage}:{e.name}: {type(e.error).__name__}: {e.error}" for e in result.errors))

    async def _event_dead(self, event: Event) -> None:
        """A dead-lettered event gives up its turn in its conversations' order lists (those of
        the chatflow route whose group dead-lettered it)."""
        if event.stream_id is None:
            return
        for cid in self.workflows.conversations_of(event, group=event.group):
            await self.chatflows().abandon(cid, event.stream_id, event.group, event.partition)

    def _component_failed(self, exc: BaseException) -> None:
        """A background component failed for good: stop consuming, so that ``wait()`` ends and
        the worker exits non-zero instead of looking healthy."""
        log.error("a background component failed for good (%s); stopping", faults.describe(exc))
        if self.consumer is not None:
            if self.consumer.failure is None:
                self.consumer.failure = exc
            self.consumer.request_stop()

    def _require_consumer_mode(self, what: str) -> None:
        if self.mode == "producer":
            raise StateError(f"{what} is not available in producer mode.")

    async def start(self) -> None:
        """Connect, start lifecycle components (cron in producer/all mode), and in worker/all
        mode start consuming in the background."""
        if self._started:
            return
        await self.connect()
        self._started = True
        if not self._observability_on:
            from orchestrator.ops.observability import enable

            self._observability_on = True
            for component in enable(self):
                self.add_lifecycle(component)
        for component in self._lifecycle:
            await component.start()
        if self.mode != "producer":
            self.delay_mover = DelayMover(self.delayed(), max_sleep_ms=IDLE_POLL_MS,
                                          on_failed=self._component_failed)
            await self.delay_mover.start()
            await faults.retry_transient(self.declare_routes)  # routes added since connect()
            consumer = self.consumer = self._new_consumer()
            self._consume_task = asyncio.create_task(consumer.run(), name="tokiwa-consumer")

    async def stop(self) -> None:
        """Stop fetching, finish in-flight work within the grace period, hand back the rest,
        stop lifecycle components (releasing leadership and locks). Idempotent."""
        if not self._started:
            return
        self._started = False
        if self.consumer is not None:
            self.consumer.request_stop()
        if self._consume_task is not None:
            try:
                await self._consume_task
            except Exception:
                log.exception("the consumer ended with an error")
            finally:
                self._consume_task = None
        if self.delay_mover is not None:
            await self.delay_mover.stop()
            self.delay_mover = None
        for component in reversed(self._lifecycle):
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %r failed", component)

    async def wait(self) -> None:
        """Wait until the background consumer ends (after stop(), or on a fatal error)."""
        if self._consume_task is not None:
            await self._consume_task

    async def drain(self, timeout: float | None = None) -> None:
        """Process until the group has nothing undelivered or pending, then return.
        Raises StateError in producer mode."""
        self._require_consumer_mode("Drain")
        await self.connect()
        await self.declare_routes()
        if self._consume_task is not None:
            await asyncio.wait_for(self._wait_drained(), timeout)
            return
        consumer = self.consumer = self._new_consumer()
        await asyncio.wait_for(consumer.run(until_drained=True), timeout)

    def _new_consumer(self) -> ConsumerGroups:
        """One consumer per route and stream partition, each on its route's group; the
        consumers of one route share its concurrency (:class:`SlotShare`)."""
        redis, name = self._session.client(), self._session.stream_broker().consumer
        consumers: dict[tuple[str, int], Consumer] = {}
        for route in self.routes():
            group = route.group(self.settings.group)
            process = self._route_process(route)
            gate = None
            if route.limits is not None:
                gate = Gate(redis, self.keys, route.name, route.limits, lease_ms=self.settings.visibility_timeout_ms)
                advert = route.advert
                # run requests (reserved types) may be the route's own: they stay limited
                gate.takes = lambda event, advert=advert: (event.type.startswith(RESERVED_PREFIX)
                                                           or advert_matches(advert, event.type))
            share = SlotShare(self.settings.concurrency) if self.settings.partitions > 1 else None
            for partition in range(self.settings.partitions):
                broker = StreamBroker(redis, self.settings, name, group=group, partition=partition)
                consumer = consumers[(group, partition)] = Consumer(broker, self.settings, process, self._event_dead)
                if share is not None:
                    consumer.share = share
                    share.members.append(consumer)
                if gate is not None:
                    consumer.gate = gate
                    consumer.observe_wait = self.hooks.on_limit_wait
        groups = ConsumerGroups(consumers)
        groups.set_observer(self.hooks.event_observer)
        return groups

    async def _wait_drained(self) -> None:
        while True:
            state = await self.group_states()
            in_flight = self.consumer.in_flight_count if self.consumer is not None else 0
            if all(s["pending"] == 0 and s["lag"] == 0 for s in state.values()) and not in_flight:
                return
            await asyncio.sleep(0.05)

    async def group_states(self) -> dict[str, dict[str, Any]]:
        """group -> {length, pending, lag, consumers, last_delivered} for this app's routes (the
        consumers' groups while consuming: the drain loop asks every 50 ms)."""
        groups = self.consumer.groups if self.consumer is not None else self.route_groups()
        return await self._session.stream_broker().groups_state_all(groups)

    async def owns(self, event: Event) -> bool:
        """Whether this worker still holds ``event``'s stream entry.

        Delivery is at least once: a worker frozen past its lease loses its entry to another
        worker. Call this right before a side effect that must happen once (or make the effect
        idempotent); tokiwa itself checks it before it records a run or acks.
        """
        if event.stream_id is None or self.broker is None:
            return False
        # the consumer's rule (it also knows the entries it lost); without one, Redis's pending list
        if self.consumer is not None and self.consumer.consumer_of(event.group, event.partition) is not None:
            return bool(await self.consumer.owned_events([event]))
        broker = StreamBroker(self._session.client(), self.settings, self.broker.consumer,
                              group=event.group or self.broker.group, partition=event.partition)
        return event.stream_id in await broker.owned([event.stream_id])

    async def _owned_entries(self, events: Sequence[Event]) -> set[tuple[str | None, int, str]]:
        """Which of ``events``' entries (group, partition, stream id) this worker still holds, before their
        runs are recorded: the consumer's rule, or all of them when the app is not consuming
        (``process_event`` called directly has no lease to lose)."""
        if self.consumer is None:
            return {(e.group, e.partition, e.stream_id) for e in events if e.stream_id}
        return await self.consumer.owned_events(events)

    # -- inspection -----------------------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        """Counters and cluster state: published, processed, failed, dead, in flight, pending,
        stream length and lag, and the workers registered in Redis."""
        await self.connect()
        return await app_snapshot(broker=self._session.stream_broker(), groups=await self.group_states(),
                                  consumer=self.consumer,
                                  workers=self.workers, mode=self.mode, is_running=self._started,
                                  namespace=self.settings.namespace, metrics=self.metrics,
                                  extra=self.hooks.extra_snapshots, runs=self.workflows.run_counters)

    async def workers(self) -> dict[str, dict[str, Any]]:
        """Worker id → heartbeat dict, from ``{ns}:workers``."""
        await self.connect()
        return await registered_workers(self._session.client(), self.keys.workers,
                                        heartbeat_interval_s=self.settings.heartbeat_interval_s)

    # -- shortcuts to two hooks (workers.assemble reads them) ------------------------------
    @property
    def extra_snapshots(self) -> dict[str, Callable[[], Any]]:
        """``hooks.extra_snapshots`` (the worker's relay adds its section here)."""
        return self.hooks.extra_snapshots

    @property
    def event_observer(self) -> Callable[[str, str], None] | None:
        """``hooks.event_observer``: set when metrics are on."""
        return self.hooks.event_observer

    @event_observer.setter
    def event_observer(self, observer: Callable[[str, str], None] | None) -> None:
        self.hooks.event_observer = observer

    # -- workflows and chatflows: delegated to the workflow registry and the chat part ----
    def register_workflow(self, workflow: Any, trigger: Any = None, **options: Any) -> Workflow:
        """Register a Workflow (or pyoco-style Flow) with a trigger: ``None`` / ``{"type": "manual"}``
        or ``{"type": "event", "event_type": str | list | re.Pattern | "*", "filter": fn,
        "map_input": fn, "map_context": fn, "map_conversation_id": fn}``. Options: input,
        context, conversation_id, concurrency, fail_fast, timeout, memory, checkpoint (False: no node
        checkpoints, see docs/workflows.md). Returns the workflow
        (its ``id`` is derived from its name, so every host agrees)."""
        return self.workflows.register(workflow, trigger, **options)

    def unregister_workflow(self, workflow_id_or_name: str) -> bool:
        return self.workflows.unregister(workflow_id_or_name)

    async def run_workflow(self, workflow: str, input: Any = None, context: Any = None, *,  # noqa: A002
                           wait: bool = True, timeout: float | None = None,
                           conversation_id: str | None = None, local: bool | None = None
                           ) -> WorkflowRunResult | str:
        """Run a registered workflow and (with ``wait``) return its WorkflowRunResult.

        A producer, or an app whose consumer is running, sends a run request through the
        stream and a worker runs it; an app in ``all``/``worker`` mode that is not consuming
        runs it here (``local=True`` forces that). ``wait=False`` returns the run id."""
        if local is None:
            local = self.mode != "producer" and self._consume_task is None
        return await self.workflows.run(workflow, input=input, context=context, conversation_id=conversation_id,
                                        wait=wait, timeout=timeout, local=local)

    async def cancel_run(self, run_id: str, *, by: str | None = None, reason: str | None = None) -> dict[str, Any]:
        """Cancel a run from any host: a running run stops at once (its signal, then its
        nodes' cancellation), a queued one never starts; its record says ``cancelled``, by whom
        and when. Returns what was done (see :func:`orchestrator.runs.cancel.cancel_run`)."""
        from orchestrator.runs.cancel import cancel_run

        await self.connect()
        return await cancel_run(self, run_id, by=by or self.source or self.worker_id, reason=reason)

    def services_for(self, run_id: str) -> RunServices:
        """What a run's nodes get as ``services``: a per-run artifact folder (created on first
        use), publish_topic."""
        return RunServices(self.artifact_store, self.publish_topic, run_id)

    def artifact_store(self) -> Any:
        """The app's artifact store (a FileArtifactStore under ``artifacts_dir`` or
        ``{state_dir}/artifacts``), built once."""
        if self._artifact_store is None:
            from orchestrator.workflow.artifacts import FileArtifactStore

            self._artifact_store = FileArtifactStore(self._artifacts_dir or (self.settings.state_dir / "artifacts"))
        return self._artifact_store

    def chatflows(self) -> ChatflowExecutor:
        """The conversation executor (locks, order, fenced memory) on this app's Redis."""
        if self._chatflows is None:
            if (redis := self.redis) is None:
                raise StateError("chatflows need a Redis connection: call connect() or start() first")
            self._chatflows = ChatflowExecutor(redis, self.keys, self.conversation_store, self.runner,
                                               lock_ttl_ms=self.conversation_lock_ttl_ms)
            self._chatflows.on_unordered = lambda: self.hooks.on_unordered() if self.hooks.on_unordered else None
        return self._chatflows

    async def publish_topic(self, topic: str, message: Any) -> int:
        """Publish a Miclow topic message (``tokiwa:topic:{topic}``) that relay tasks on any
        host subscribed to ``topic`` receive as ``topic:message``."""
        await self.connect()
        frame = encode_topic_frame(f"app-{self.worker_id}", socket.gethostname(), "app", str(message))
        return await self._session.client().publish(self.keys.topic(topic), frame)

    # -- cron: delegated to the cron registry ------------------------------------------------
    def register_cron_job(self, expr: str, name: str, handler: Callable[..., Any]) -> str:
        """Run ``handler(job_name, slot)`` on every slot of ``expr`` (5 fields, or 6 with a
        leading seconds field), on the leader producer only; returns the job id."""
        return self.cron.add(expr, name, handler, "job")

    def register_cron_event(self, expr: str, event_type: str, name: str, payload: Any = None,
                            metadata: Mapping[str, Any] | None = None) -> str:
        """Publish ``event_type`` on every slot of ``expr``."""
        Event(event_type)  # a blank type fails now, not at 3 a.m.
        return self.cron.add(expr, name, self.cron.event_handler(event_type, payload, dict(metadata or {})),
                             "event")

    def register_cron_workflow(self, expr: str, workflow_id: str, name: str, input: Any = None,  # noqa: A002
                               context: Any = None) -> str:
        """Start a registered workflow on every slot of ``expr`` (chatflows are refused: they
        need a conversation id)."""
        workflow = self.workflows.get(workflow_id).workflow  # NotFoundError for unknown ids
        return self.cron.add(expr, name, self.cron.workflow_handler(workflow, input, context), "workflow")

    def remove_cron_job(self, job_id_or_name: str) -> bool:
        return self.cron.remove(job_id_or_name)

    def is_cron_job_scheduled(self, job_id_or_name: str) -> bool:
        return self.cron.is_scheduled(job_id_or_name)

    async def __aenter__(self) -> Orchestrator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await self.close()
