"""Writes that must survive redis-py's automatic resend: the first attempt of a command
reaches Redis and runs, its reply is lost (the connection drops), and the client
(:func:`orchestrator.broker.connection.create_redis`, which retries on a dropped connection) sends it
again. A plain ``SET NX`` then answers nil and its caller thinks someone else holds the key.

:class:`LostReplyProxy` sits between the client and a real redis-server and drops the reply
to the next command that contains a marker (a script's SHA1, or a key), closing the client's
connection instead. Each test counts what was lost (a claim nobody got), duplicated (two
holders, two runs) or stuck (a key left taken), and bounds its time.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.broker.connection import create_redis
from orchestrator.chat.chatflow import ChatflowExecutor
from orchestrator.chat.conversations import APPLY_AND_RELEASE, APPLY_DELTA, RedisConversationStore
from orchestrator.cron.scheduler import FIRE, LeaderScheduler
from orchestrator.dispatcher import EventDispatcher
from orchestrator.events import Event
from orchestrator.leader import LeaderElector
from orchestrator.locks import ACQUIRE, RELEASE, RENEW, claim_once, conversation_lock
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.runner import Runner

pytestmark = pytest.mark.timeout(30)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


class LostReplyProxy:
    """A loopback TCP proxy to a redis-server that can lose one reply: the command that contains
    an armed marker is forwarded (Redis runs it), then the client's connection is closed
    before the reply reaches it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.armed: list[bytes] = []
        self.dropped = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._pumps: set[asyncio.Task] = set()

    async def start(self) -> LostReplyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, marker: bytes) -> None:
        """Lose the reply to the next command containing ``marker`` (once per call)."""
        self.armed.append(marker)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self._transports):
            transport.abort()  # the pumps see EOF and end
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._pumps.add(task)
        upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._transports |= {client_w.transport, upstream_w.transport}
        lose_next_reply = False

        async def to_server() -> None:
            nonlocal lose_next_reply
            while data := await client_r.read(65536):
                for marker in self.armed:
                    if marker in data:
                        self.armed.remove(marker)
                        lose_next_reply = True
                        break
                upstream_w.write(data)
                await upstream_w.drain()
            upstream_w.close()

        async def to_client() -> None:
            while data := await upstream_r.read(65536):
                if lose_next_reply:  # Redis ran the command; its client never hears of it
                    self.dropped += 1
                    client_w.transport.abort()
                    upstream_w.transport.abort()
                    return
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        try:
            await asyncio.gather(to_server(), to_client(), return_exceptions=True)
        finally:
            client_w.transport.abort()
            upstream_w.transport.abort()
            self._transports -= {client_w.transport, upstream_w.transport}
            if task is not None:
                self._pumps.discard(task)


@pytest.fixture
async def proxy(redis_server, aredis):
    # the scripts are cached on the server first: otherwise the armed EVALSHA would answer
    # NOSCRIPT without running, and the lost reply would be that error
    for script in (ACQUIRE, RENEW, RELEASE, FIRE, APPLY_DELTA, APPLY_AND_RELEASE):
        await aredis.script_load(script)
    p = await LostReplyProxy(redis_server.port).start()
    yield p
    await p.close()


@pytest.fixture
async def client(proxy):
    """The project's client (with its resend-on-disconnect policy), through the proxy."""
    c = create_redis(proxy.url)
    yield c
    await c.aclose()


async def test_the_fault_is_real_a_plain_set_nx_whose_reply_was_lost_reports_it_taken(proxy, client, aredis,
                                                                                      keys):
    """The control: what the code used before for once-claims loses the claim under this fault."""
    key = keys.once("plain")
    proxy.arm(key.encode())
    answer = await client.set(key, "me", nx=True)
    assert proxy.dropped == 1, "the proxy lost one reply and the client resent the command"
    assert answer is None, "the resent SET NX found our own value and answered nil"
    assert await aredis.get(key) == b"me"


async def test_a_lock_acquire_whose_reply_was_lost_counts_as_acquired(proxy, client, aredis, keys):
    held = conversation_lock(client, keys, "c1", ttl_ms=2_000)
    proxy.arm(sha(ACQUIRE))
    seed_ms = int(time.time() * 1000) - 1000
    token = await asyncio.wait_for(held.acquire(timeout_s=5), 10)
    lost = 0 if held.owned else 1
    assert proxy.dropped == 1
    assert lost == 0
    assert await aredis.get(keys.conversation_lock("c1")) == held.token.encode()
    # the lost attempt seeded the epoch from Redis's clock, the resend took the next one: a
    # duplicated increment, and harmless
    assert token == int(await aredis.get(keys.conversation_lock_epoch("c1"))) >= seed_ms + 1
    duplicated = int(await conversation_lock(aredis, keys, "c1").try_acquire())
    assert duplicated == 0, "a second holder got the lock"
    assert await held.release() is True
    stuck = await aredis.exists(keys.conversation_lock("c1"))
    assert stuck == 0


async def test_lock_renewal_and_release_whose_replies_were_lost_keep_and_free_the_lock(proxy, client, aredis,
                                                                                       keys):
    held = conversation_lock(client, keys, "c1", ttl_ms=600, renew_ms=100)
    await held.acquire(timeout_s=5)
    proxy.arm(sha(RENEW))
    for _ in range(100):
        if proxy.dropped:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.7)  # longer than the lease: only renewals that worked keep it
    assert proxy.dropped == 1
    assert held.owned and not held.lost, "a resent renewal lost the lock"
    proxy.arm(sha(RELEASE))
    await held.release()  # the resend finds the key gone and answers "not ours": only a misreport
    assert proxy.dropped == 2
    assert await aredis.exists(keys.conversation_lock("c1")) == 0, "the lock stayed taken"
    nxt = conversation_lock(aredis, keys, "c1")
    assert await nxt.try_acquire() is True
    await nxt.release()


async def test_a_leader_campaign_whose_reply_was_lost_still_elects_us(proxy, client, aredis, keys):
    me = LeaderElector(client, keys, "cron", ttl_ms=2_000)
    proxy.arm(sha(ACQUIRE))
    seed_ms = int(time.time() * 1000) - 1000
    assert await asyncio.wait_for(me.try_acquire(), 10) is True
    assert proxy.dropped == 1
    assert me.is_leader and me.epoch == int(await aredis.get(keys.leader_epoch("cron"))) >= seed_ms + 1
    assert await aredis.get(keys.leader("cron")) == me.holder_id.encode()
    other = LeaderElector(aredis, keys, "cron", ttl_ms=2_000)
    assert await other.try_acquire() is False, "two leaders"
    await me.stop()
    assert await aredis.exists(keys.leader("cron")) == 0


class FixedClock:
    def now(self) -> datetime:
        return T0

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0.01)


async def test_a_cron_fire_whose_reply_was_lost_still_fires_the_slot_once(proxy, client, aredis, keys):
    clock = FixedClock()
    elector = LeaderElector(client, keys, "cron", ttl_ms=5_000, clock=clock)
    sched = LeaderScheduler(elector, client, keys, clock=clock, tz="UTC")
    fired: list[datetime] = []

    async def handler(name: str, slot: datetime) -> None:
        fired.append(slot)

    sched.add_job("* * * * * *", "sec", handler)
    assert await elector.try_acquire()
    await sched.tick(T0)
    proxy.arm(sha(FIRE))
    got = await asyncio.wait_for(sched.tick(T0 + timedelta(seconds=1.5)), 10)
    await asyncio.gather(*sched._running)
    slot = T0 + timedelta(seconds=1)
    assert proxy.dropped == 1
    assert got == [("sec", slot)], "the slot was lost: the resent claim counted as fired by another"
    assert fired == [slot]
    job = sched.get_job("sec")
    assert await sched._claim(job, slot) is False, "a new claim of a fired slot must not win"
    assert await sched.tick(T0 + timedelta(seconds=1.5)) == []
    await asyncio.gather(*sched._running)
    assert fired == [slot], "the slot fired twice"
    state = await aredis.hgetall(keys.cron_job("sec"))
    assert state[b"slot"] == b"2026-01-01T12:00:01Z"
    assert state[b"token"].decode().startswith(f"{elector.holder_id}/")
    await sched.stop()


async def test_a_once_claim_whose_reply_was_lost_still_runs_the_handler_exactly_once(proxy, client, aredis,
                                                                                     keys):
    """Two "processes" (dispatchers) subscribe the same once-handler; the first one's claim
    loses its reply. The handler runs exactly once across both, and never again."""
    runs: list[str] = []

    def process(who: str, redis) -> EventDispatcher:
        d = EventDispatcher()

        async def claim(name: str) -> bool:
            return await claim_once(redis, keys.once(name), f"worker-{who}")

        async def greet(event: Event) -> None:
            runs.append(who)

        d.once_claim = claim
        d.subscribe("user.created", greet, once=True, name="greet")
        return d

    dispatchers = {"a": process("a", client), "b": process("b", aredis)}
    proxy.arm(keys.once("greet").encode())
    first = await asyncio.wait_for(dispatchers["a"].dispatch(Event("user.created", {})), 10)
    assert proxy.dropped == 1
    assert first.ok and first.delivered == 1
    for who in ("b", "a"):
        await dispatchers[who].dispatch(Event("user.created", {}))
    assert runs == ["a"], f"lost or duplicated: {runs}"
    assert (await aredis.get(keys.once("greet"))).decode().startswith("worker-a/")


async def test_a_memory_write_whose_reply_was_lost_is_applied_once(proxy, client, aredis, keys):
    """The fenced delta script (with the lock's release: a chatflow's last write), resent: the
    event id dedupe makes the resend a no-op, and the release finds the lock already gone."""
    store = RedisConversationStore(client, keys)

    def count(ctx):
        ctx.update_memory({"count": ctx.memory.get("count", 0) + 1,
                           "seen": [*ctx.memory.get("seen", []), ctx.event.payload]})

    flow = Workflow("count", nodes=[Node("count", count)], type="chatflow")
    ex = ChatflowExecutor(client, keys, store, Runner(), lock_ttl_ms=2_000)
    proxy.arm(sha(APPLY_AND_RELEASE))
    result = await asyncio.wait_for(ex.run(flow, conversation_id="c1", event=Event("chat", "hi")), 10)
    await asyncio.wait_for(ex.run(flow, conversation_id="c1", event=Event("chat", "again")), 10)
    assert proxy.dropped == 1
    assert result.status == "succeeded"
    assert await RedisConversationStore(aredis, keys).get("c1") == {"count": 2, "seen": ["hi", "again"]}
