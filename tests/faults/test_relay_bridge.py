"""The bridge between the relay and the event world, inside a real worker process:
a workflow node publishes a topic line, a relay child answers, the answer becomes an event;
a child that dies becomes a relay.task_exited event."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import msgpack

from orchestrator import Orchestrator
from tests.integration.procs import start_worker, stop, wait_until, worker_env


def _child_pids(worker_pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == worker_pid:
                out.append(int(entry))
    return out


def _five_orders(redis_url: str, namespace: str) -> None:
    async def produce() -> None:
        app = Orchestrator(redis_url, namespace=namespace, mode="producer")
        for i in range(5):
            await app.publish("order.created", {"ref": f"R-{i}", "items": [{"sku": "x", "qty": 1, "price": 2}]})
        await app.close()
    asyncio.run(produce())


def test_node_topic_line_reaches_a_child_whose_answer_becomes_an_event(redis_url, namespace, sync_redis,
                                                                       subprocess_env, tmp_path):
    env = worker_env(subprocess_env, redis_url, namespace)
    worker = start_worker(env, tmp_path / "w.log", "--relay", "examples/relay/shop.toml", app="examples.shop:app")
    try:
        wait_until(lambda: sync_redis.hlen(f"{namespace}:relays") == 1, 30, message="relay up")
        _five_orders(redis_url, namespace)
        wait_until(lambda: sync_redis.llen(f"{namespace}:demo:desk_acks") == 5, 30, message="5 desk acks")
        acks = sorted(x.decode() for x in sync_redis.lrange(f"{namespace}:demo:desk_acks", 0, -1))
        assert acks == [f"R-{i} packed" for i in range(5)]
        counts = sync_redis.hgetall(f"{namespace}:demo:events")
        assert counts[b"desk.ack"] == b"5"  # each relay line became exactly one event

        # a relay child that dies is announced as an event (and restarted: restart = on-failure)
        children = _child_pids(worker.pid)
        assert children, "the relay child runs under the worker"
        os.kill(children[0], signal.SIGKILL)
        wait_until(lambda: sync_redis.hget(f"{namespace}:demo:events", "relay.task_exited") is not None, 20,
                   message="relay.task_exited event")
        exited = [e for e in sync_redis.xrange(f"{{{namespace}:0}}:events")
                  if e[1][b"type"] == b"relay.task_exited"]
        body = msgpack.unpackb(exited[0][1][b"body"])
        assert body["payload"]["task"] == "shipping-desk" and body["payload"]["failed"] is True
        wait_until(lambda: len(_child_pids(worker.pid)) == 1, 20, message="child restarted")
    finally:
        code = stop(worker)
    assert code == 0
    time.sleep(0.2)
    assert _child_pids(worker.pid) == []


def test_the_relay_runs_once_per_host_under_processes_and_replicas(redis_url, namespace, sync_redis,
                                                                    subprocess_env, tmp_path):
    """``--processes 2 --relay`` and a second replica with ``--relay`` on the same host: one
    relay runs (the others stand by), so each order gives one desk.ack, not three; when the
    relay's worker stops, a standing-by one takes over."""
    env = worker_env(subprocess_env, redis_url, namespace)
    supervised = start_worker(env, tmp_path / "sup.log", "--processes", "2", "--relay", "examples/relay/shop.toml",
                              app="examples.shop:app")
    replica = start_worker(env, tmp_path / "replica.log", "--relay", "examples/relay/shop.toml",
                           app="examples.shop:app")
    try:
        wait_until(lambda: sync_redis.hlen(f"{namespace}:relays") == 1, 30, message="one relay up")
        time.sleep(1.0)  # the others had time to start a second relay, if they would
        assert sync_redis.hlen(f"{namespace}:relays") == 1, "a second relay runs on this host"
        _five_orders(redis_url, namespace)
        wait_until(lambda: sync_redis.llen(f"{namespace}:demo:desk_acks") == 5, 30, message="5 desk acks")
        time.sleep(1.0)  # a duplicate would arrive by now
        first = (sync_redis.llen(f"{namespace}:demo:desk_acks"), sync_redis.hget(f"{namespace}:demo:events", "desk.ack"))
        holder = sync_redis.hkeys(f"{namespace}:relays")[0].decode()
        # stop whoever runs it: a standing-by worker takes the relay over
        runs_in_replica = "running the relay on this host" in (tmp_path / "replica.log").read_text()
        assert stop(replica if runs_in_replica else supervised) == 0
        started = time.monotonic()
        wait_until(lambda: sync_redis.hlen(f"{namespace}:relays") == 1
                   and sync_redis.hkeys(f"{namespace}:relays")[0].decode() != holder, 30, message="the relay taken over")
        took_over = time.monotonic() - started
        _five_orders(redis_url, namespace)
        wait_until(lambda: sync_redis.llen(f"{namespace}:demo:desk_acks") == 10, 30, message="5 more desk acks")
        time.sleep(1.0)
        second = sync_redis.llen(f"{namespace}:demo:desk_acks")
    finally:
        codes = [stop(p) for p in (supervised, replica)]
    print(f"one relay for 3 workers; taken over in {took_over:.1f}s after its worker stopped")
    assert first == (5, b"5") and second == 10
    assert codes == [0, 0]
