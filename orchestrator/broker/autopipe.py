"""Auto-pipelining: one shared client that sends the commands of many concurrent tasks to
Redis as one pipeline per loop tick.

Sixty-four handlers that each ``await redis.incr(...)`` make sixty-four round trips, each
paying redis-py's connection checkout, a socket write, a read and a task wake-up. Through an
:class:`AutoPipeline` the commands they issue in the same loop tick are queued, written as one
pipeline (``transaction=False``) on one connection, and each reply is routed back to the task
that awaits it. While a batch is in flight, new commands gather for the next one, so batches
grow with the load and a lone caller waits one loop tick at most.

    pipe = AutoPipeline(app.redis)          # or shared_pipeline(app.redis): one per client
    await pipe.incr("hits")                 # every redis-py command method works
    group = pipe.pipeline()                 # several commands, one awaitable, in order
    group.incr("n").zadd("seen", {event.id: now})
    count, added = await group.execute()

What it guarantees:

- replies and errors are per command: a command Redis refuses raises its own
  ``ResponseError`` in its own caller, the others of the batch succeed; a failure of the
  whole round trip (connection lost, timeout) raises in every caller of that batch;
- commands of one task keep their order (one queue, batches sent in order when
  ``max_in_flight`` is 1, the default);
- no atomicity across callers (it is a pipeline, not MULTI): use a transaction or a script
  where atomicity matters;
- a caller cancelled while its command is still queued takes the command out: it is never
  sent. Once sent it is not recalled (as with any Redis command);
- blocking commands (``BLPOP``, ``XREADGROUP ... BLOCK``, ``WAIT``), ``MULTI`` / ``WATCH``
  and pub/sub would hold up every other caller of the batch: they raise
  :class:`~orchestrator.errors.InvalidArgumentError`; use the client itself for them.

The client's own policy (timeouts, retries, the fault model's classes) applies to each
batch: it is redis-py's pipeline on that client.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncCoreCommands
from redis.exceptions import ResponseError

from orchestrator.errors import InvalidArgumentError, StateError

#: most commands written in one batch (a bigger backlog goes out in the next batches)
MAX_BATCH = 1000
#: commands that would block the whole batch or change the connection's state
_REFUSED = frozenset({
    "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
    "WAIT", "WAITAOF", "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH", "MONITOR",
    "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE",
    "SELECT", "RESET", "QUIT", "CLIENT",
})
_MAY_BLOCK = frozenset({"XREAD", "XREADGROUP"})

Command = tuple[tuple[Any, ...], dict[str, Any]]


def _is_block(arg: Any) -> bool:
    if isinstance(arg, bytes):
        return arg.upper() == b"BLOCK"
    return isinstance(arg, str) and arg.upper() == "BLOCK"


def _check(args: Sequence[Any]) -> None:
    """InvalidArgumentError for a command that must not share a batch (see the module doc)."""
    if not args:
        raise InvalidArgumentError("an auto-pipelined command needs a name")
    name = args[0]
    head = (name.decode("latin-1") if isinstance(name, bytes) else str(name)).partition(" ")[0].upper()
    if head in _REFUSED or (head in _MAY_BLOCK and any(_is_block(a) for a in args[1:])):
        raise InvalidArgumentError(
            f"{head} cannot be auto-pipelined (it blocks or changes the connection for every caller "
            "of the batch): call it on the client itself")


class _Item:
    """What one caller queued: one command (``group`` False) or a group's commands, and the
    future its caller awaits."""

    __slots__ = ("commands", "future", "group", "raise_on_error")

    def __init__(self, commands: list[Command], future: asyncio.Future[Any], group: bool,
                 raise_on_error: bool = True) -> None:
        self.commands, self.future, self.group, self.raise_on_error = commands, future, group, raise_on_error

    def resolve(self, replies: Sequence[Any]) -> None:
        fut = self.future
        if fut.done():  # its caller was cancelled while the batch was in flight
            return
        if not self.group:
            reply = replies[0]
            if isinstance(reply, BaseException):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)
            return
        if self.raise_on_error:
            for reply in replies:
                if isinstance(reply, ResponseError):
                    fut.set_exception(reply)
                    return
        fut.set_result(list(replies))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class AutoPipeline(AsyncCoreCommands):
    """A shared client whose commands, issued concurrently, are sent as pipelines.

    Every redis-py command method (``get``, ``incr``, ``zadd``, ``xadd``, ``evalsha``,
    ``register_script`` ...) queues its command at once and returns an ``asyncio.Future`` of
    its reply (await it, or pass it to ``gather`` / ``wait_for``; ``create_task`` wants a
    coroutine: wrap it in one).
    ``max_in_flight`` batches may be on the wire at once (each on its own pooled connection);
    with more than 1, batches may overtake each other, so one task's commands keep their order
    only when it awaits each before sending the next. ``stats`` counts ``batches`` and
    ``commands`` sent."""

    _event_dispatcher: Any = None  # redis-py's command mixins declare it; nothing here dispatches

    def __init__(self, client: aioredis.Redis, *, max_batch: int = MAX_BATCH, max_in_flight: int = 1) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise InvalidArgumentError(f"max_batch and max_in_flight must be >= 1, got {max_batch}, {max_in_flight}")
        self.client = client
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.stats = {"batches": 0, "commands": 0}
        self._queue: deque[_Item] = deque()
        self._senders: set[asyncio.Task[None]] = set()
        self._starting = False  # a sender was created and has not taken its first batch yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- queueing -------------------------------------------------------------------------
    def execute_command(self, *args: Any, **options: Any) -> asyncio.Future[Any]:
        """Queue one command; the future resolves to its reply (redis-py's response callbacks
        applied) or raises its error."""
        _check(args)
        fut = self._future()
        self._push(_Item([(args, options)], fut, False))
        return fut

    def pipeline(self, transaction: bool = False) -> CommandGroup:
        """A group of commands queued together and answered together, in order (``await
        group.execute()``). ``transaction=True`` is refused: a group is not atomic."""
        if transaction:
            raise InvalidArgumentError("an auto-pipelined group is not a transaction: use "
                                       "client.pipeline(transaction=True) for MULTI / EXEC")
        return CommandGroup(self)

    def _future(self) -> asyncio.Future[Any]:
        if self._closed:
            raise StateError("this AutoPipeline is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise StateError("an AutoPipeline serves the event loop it was first used on")
        return loop.create_future()

    def _push(self, item: _Item) -> None:
        self._queue.append(item)
        self._maybe_start()

    def _maybe_start(self) -> None:
        """Start a sender unless one is about to take the queue or ``max_in_flight`` are busy."""
        if not self._starting and len(self._senders) < self.max_in_flight:
            self._starting = True
            task = asyncio.get_running_loop().create_task(self._send_loop(), name="tokiwa-autopipe")
            self._senders.add(task)

    # -- sending --------------------------------------------------------------------------
    def _take(self) -> list[_Item]:
        """The next batch: whole items, oldest first, up to ``max_batch`` commands (always at
        least one item); items whose caller was cancelled are dropped unsent."""
        batch: list[_Item] = []
        size = 0
        queue = self._queue
        while queue and (size == 0 or size + len(queue[0].commands) <= self.max_batch):
            item = queue.popleft()
            if item.future.done():
                continue
            batch.append(item)
            size += len(item.commands)
        return batch

    async def _send_loop(self) -> None:
        """Send batches while commands are queued (one task per burst of work, not per batch).
        Commands queued while a batch is in flight form the next batch."""
        self._starting = False
        try:
            while self._queue:
                batch = self._take()
                if self._queue:
                    self._maybe_start()  # the rest may go out meanwhile (max_in_flight > 1)
                if batch:
                    await self._send(batch)
        finally:
            # leave the set before anything else runs: a command queued from now on starts a sender
            self._senders.discard(asyncio.current_task())

    async def _send(self, batch: list[_Item]) -> None:
        pipe = self.client.pipeline(transaction=False)
        queue: Any = pipe.pipeline_execute_command  # untyped in redis-py
        for item in batch:
            for args, options in item.commands:
                queue(*args, **options)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for item in batch:
                item.fail(StateError("the AutoPipeline was closed while this command was in flight"))
            raise
        except Exception as exc:  # the round trip failed: every caller of the batch sees it
            for item in batch:
                item.fail(exc)
            return
        self.stats["batches"] += 1
        expected = sum(len(item.commands) for item in batch)
        if len(replies) != expected:  # never left hanging, whatever the client answered
            for item in batch:
                item.fail(StateError(f"the pipeline answered {len(replies)} replies for {expected} commands"))
            return
        at = 0
        for item in batch:
            n = len(item.commands)
            item.resolve(replies[at:at + n])
            at += n
        self.stats["commands"] += at

    # what redis-py's Script objects read from their client
    @property
    def connection_pool(self) -> Any:
        return self.client.connection_pool

    def get_encoder(self) -> Any:
        encoder: Any = self.client.get_encoder  # untyped in redis-py
        return encoder()

    # -- lifecycle ------------------------------------------------------------------------
    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Refuse new commands, send what is queued and wait for the batches in flight (at
        most ``timeout_s``, then they are cancelled and their callers get a StateError).
        Idempotent; the client itself stays open (it is the caller's)."""
        self._closed = True
        senders = set(self._senders)
        if not senders:
            return
        _, late = await asyncio.wait(senders, timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        for item in self._queue:
            item.fail(StateError("the AutoPipeline was closed before this command was sent"))
        self._queue.clear()

    @property
    def queued(self) -> int:
        """Commands waiting for the next batch."""
        return sum(len(item.commands) for item in self._queue)


class CommandGroup(AsyncCoreCommands):
    """Commands queued on an :class:`AutoPipeline` as one unit: its command methods return
    the group (chainable, like a redis-py pipeline) and :meth:`execute` sends them in the next
    batch and returns their replies in order."""

    _event_dispatcher: Any = None

    def __init__(self, owner: AutoPipeline) -> None:
        self._owner = owner
        self._commands: list[Command] = []

    def execute_command(self, *args: Any, **options: Any) -> CommandGroup:
        _check(args)
        self._commands.append((args, options))
        return self

    pipeline_execute_command = execute_command

    def __len__(self) -> int:
        return len(self._commands)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send the queued commands (in the owner's next batch) and return their replies;
        with ``raise_on_error`` the first command error is raised, else errors are returned
        in place of their replies. The group is empty afterwards, ready for reuse."""
        commands, self._commands = self._commands, []
        if not commands:
            return []
        fut = self._owner._future()
        self._owner._push(_Item(commands, fut, True, raise_on_error))
        result: list[Any] = await fut
        return result


_shared: weakref.WeakKeyDictionary[aioredis.Redis, AutoPipeline] = weakref.WeakKeyDictionary()


def shared_pipeline(client: aioredis.Redis) -> AutoPipeline:
    """The one :class:`AutoPipeline` of ``client`` (made on first use), so that every handler
    of a process that uses the app's client coalesces into the same batches."""
    pipe = _shared.get(client)
    if pipe is None or pipe._closed:
        pipe = _shared[client] = AutoPipeline(client)
    return pipe
