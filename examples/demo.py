"""`make demo`: a producer and two workers on an embedded redis-server, as separate processes.

It publishes orders (an event-triggered DAG workflow), runs a workflow and waits for its
result, lets cron fire under leader election, plays a chatflow with conversation memory, and
relays topic lines between a workflow node and a child process. It prints what happened and
exits 0 (in well under a minute). ``--forever`` keeps publishing until Ctrl+C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

from orchestrator.broker.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
NS = "demo"
APP = "examples.shop:app"


def say(text: str = "") -> None:
    print(text, flush=True)


def spawn(name: str, argv: list[str], env: dict, logs: Path) -> subprocess.Popen:
    out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed when the demo ends
    return subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


async def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}")


async def scenario(url: str, forever: bool, logs: Path) -> None:
    os.environ.update(TOKIWA_REDIS_URL=url, TOKIWA_NAMESPACE=NS)
    from examples import shop  # the same app object the workers load

    app = shop.app
    app.mode = "producer"
    app.configure(redis_url=url, namespace=NS)
    await app.connect()
    r = app.redis
    say("\n1. Two workers registered their heartbeats in tokiwa's Redis (HGETALL demo:workers):")
    workers = await wait_for(lambda: _workers(r), 30, "two workers")
    for w in workers:
        say(f"   worker pid {w['pid']} on {w['host']}, concurrency {w['concurrency']}")

    say("\n2. Publishing 10 orders; each starts the DAG workflow order-flow "
        "(validate -> charge + reserve -> ship):")
    for i in range(1, 11):
        items = [{"sku": "tea", "qty": i, "price": 3}, {"sku": "cup", "qty": 1, "price": 5}]
        await app.publish("order.created", {"ref": f"A-{i:03d}", "items": items})
    shipped = await wait_for(lambda: _full(r.hgetall(f"{NS}:demo:shipped"), 10), 30, "10 shipped orders")
    by_pid: dict[str, int] = {}
    for _ref, value in sorted(shipped.items()):
        _total, pid = value.decode().split(":")
        by_pid[pid] = by_pid.get(pid, 0) + 1
    say(f"   10 orders shipped; the two workers shared them: {by_pid} (pid: orders)")
    runs = await app.run_store.list(workflow="order-flow", limit=100)
    say(f"   run store: {len(runs)} order-flow runs, statuses {sorted({x['status'] for x in runs})}")

    say("\n3. run_workflow('order-report') goes through the stream; a worker runs it and answers:")
    result = await app.run_workflow("order-report", timeout=30)
    say(f"   status={result.status} output={result.output_of('totals')} in {result.duration_ms:.1f} ms")

    say("\n4. A chatflow: two conversations, three messages each, memory kept per conversation:")
    for n in range(3):
        for conv in ("alice", "bob"):
            await app.publish("chat.message", {"conversation": conv, "text": f"{conv} message {n + 1}"})
    for conv in ("alice", "bob"):
        memory = await wait_for(lambda c=conv: _turns(app, c, 3), 30, f"conversation {conv}")
        say(f"   {conv}: turns={memory['turns']} history={memory['history']}")

    say("\n5. The relay: each shipped order went as a topic line `orders.shipped:<ref>` to a child")
    say("   process (shipping-desk), whose answer `desk.ack:<ref> packed` came back as an event:")
    acks = await wait_for(lambda: _full(r.lrange(f"{NS}:demo:desk_acks", 0, -1), 10), 30, "desk acks")
    say(f"   {len(acks)} acks, e.g. {acks[0].decode()!r}")

    say("\n6. Cron: the producer leads (SET NX lease demo:leader:cron) and fires system.heartbeat every 2 s:")
    beats = await wait_for(lambda: _count(r, "system.heartbeat", 2), 30, "two heartbeats")
    leader = await r.get(f"{{{NS}:leader:cron}}")
    say(f"   {beats} heartbeats so far, leader = {leader.decode() if leader else None}")

    if forever:
        say("\n--forever: publishing an order every 2 s; Ctrl+C to stop.")
        i = 100
        while True:
            i += 1
            await app.publish("order.created", {"ref": f"A-{i:03d}", "items": [{"sku": "tea", "qty": 1, "price": 3}]})
            snap = await app.snapshot()
            say(f"   published A-{i:03d}; pending={snap['pending']} dead={snap['dead']} stream={snap['stream_length']}")
            await asyncio.sleep(2)

    snap = await app.snapshot()
    counts = {k.decode(): int(v) for k, v in (await r.hgetall(f"{NS}:demo:events")).items()}
    say(f"\n7. Snapshot: stream length {snap['stream_length']}, pending {snap['pending']}, "
        f"dead letters {snap['dead']}; events seen by type: {counts}")
    await app.close()


async def _workers(r) -> list | None:
    raw = await r.hgetall(f"{NS}:workers")
    found = [msgpack.unpackb(v) for v in raw.values()]
    return found if len(found) >= 2 else None


async def _full(coro, n: int):
    value = await coro
    return value if len(value) >= n else None


async def _turns(app, conversation: str, turns: int):
    memory = await app.conversation_store.get(conversation)
    return memory if memory.get("turns", 0) >= turns else None


async def _count(r, event_type: str, n: int):
    value = await r.hget(f"{NS}:demo:events", event_type)
    return int(value) if value and int(value) >= n else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--forever", action="store_true", help="keep running until Ctrl+C")
    args = parser.parse_args()
    state = Path(os.environ.get("TOKIWA_STATE_DIR") or tempfile.mkdtemp(prefix="tokiwa-demo-"))
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    say("tokiwa demo: starting an embedded redis-server, a producer and two workers")
    with EmbeddedRedis(state / "redis") as server:
        env = dict(os.environ, TOKIWA_REDIS_URL=server.url, TOKIWA_NAMESPACE=NS, PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(ROOT), TOKIWA_STATE_DIR=str(state))
        say(f"   redis-server at {server.url} (files under {state})")
        procs = {
            "producer": spawn("producer", ["orchestrator.cli.producer", "run", "--app", APP], env, logs),
            "worker-1": spawn("worker-1", ["workers.cli", "run", "--app", APP, "--relay",
                                           "examples/relay/shop.toml"], env, logs),
            "worker-2": spawn("worker-2", ["workers.cli", "run", "--app", APP], env, logs),
        }
        code = 0
        try:
            asyncio.run(scenario(server.url, args.forever, logs))
        except KeyboardInterrupt:
            say("\nCtrl+C: stopping")
        except SystemExit as exc:
            say(str(exc))
            code = 1
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            codes = {name: proc.wait(60) for name, proc in procs.items()}
        say(f"\n8. SIGTERM to every process: exit codes {codes} (0 = finished in-flight work and left cleanly)")
        say(f"   logs: {logs}")
    say(f"\ndemo finished in {time.monotonic() - started:.1f} s")
    return code if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
