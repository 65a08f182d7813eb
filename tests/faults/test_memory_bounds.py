"""A soak: a real worker process and two cron producers (leader election) run a mixed workload
for ~20 s with small TTLs and bounds; then every key of the namespace is SCANned and each must
belong to a known family and satisfy that family's bound (a TTL, a size, or a count).

The families and their rules are the table :data:`RULES`; a key that matches none fails the
test, so a new key family must say here (and in the README's key table) what bounds it.
The workload is the app in tests/faults/soak_app.py, published from this process.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from orchestrator.keys import Keys
from orchestrator.runs.cancel import CANCEL_TTL_S
from orchestrator.runs.registry import RESULT_TTL_S
from tests.faults.soak_app import ONCE_SUBSCRIBER, ROUTES, build_app
from tests.groups import lag_total, pending_total
from tests.integration.procs import ROOT, start_worker, stop, wait_until, worker_env

APP = "tests.faults.soak_app:app"
SOAK_S = 20.0
HOT_CONVERSATIONS = 20  # each written every ~2 s (within its TTL); plus one new conversation per round
DAY_S = 86_400

#: the small bounds the soak runs with (settings of every process, ``TOKIWA_<NAME>``)
SETTINGS = {
    "conversation_ttl_s": 4,
    "run_records_max": 100,
    "run_retention_s": 120,
    "publish_dedup_ms": 2_000,
    "idempotency_window_s": 4,
    "dead_maxlen": 100,
    "heartbeat_interval_s": 1,
    "cron_lease_ms": 2_000,
}
CONCURRENCY = 16  # the worker's default: runs that may be running (never trimmed by count)
RUNS_BOUND = SETTINGS["run_records_max"] + max(1, SETTINGS["run_records_max"] // 100) + CONCURRENCY


@dataclass(frozen=True)
class Rule:
    """One key family: a key pattern (``@`` = one id, no ``:``; ``*`` = anything) and its bound."""

    family: str
    template: str
    ttl_max_s: float | None = None  # the key must have a TTL of at most this
    size_max: int | None = None  # its size (XLEN, ZCARD, HLEN, LLEN) at most this
    count_max: int | None = None  # at most this many keys of the family

    def regex(self) -> re.Pattern[str]:
        text = re.escape(self.template).replace("@", "[^:]+").replace(r"\*", ".+")
        return re.compile(f"^{text}$")


def rules(keys: Keys, cancels: int) -> list[Rule]:
    """Every key family of a namespace, each with what bounds it in this soak."""
    s = SETTINGS
    conv_ttl = s["conversation_ttl_s"]
    return [
        Rule("event stream", keys.events, size_max=250),  # trimmed below what every group acked
        Rule("dead letters", keys.dead, size_max=s["dead_maxlen"] + 100),  # MAXLEN ~
        Rule("delayed events", keys.delayed, size_max=3),  # only the three due in an hour are left
        Rule("delayed event fields", keys.delayed_events, size_max=3),
        Rule("publish markers", keys.published("@"), ttl_max_s=max(s["publish_dedup_ms"] / 1000,
                                                                    s["idempotency_window_s"])),
        Rule("conversation order lists", keys.conversation_order("@", "*"), size_max=0),  # none once drained
        Rule("conversation order lists", keys.conversation_order("@"), size_max=0),
        Rule("layout", keys.layout, count_max=1, size_max=1),
        Rule("worker heartbeats", keys.workers, size_max=3),  # stale entries are pruned
        Rule("relay heartbeats", keys.relays, size_max=0),
        Rule("route adverts", keys.routes, size_max=ROUTES),
        Rule("run index", keys.runs, size_max=RUNS_BOUND),
        Rule("run records", keys.run("@"), ttl_max_s=s["run_retention_s"], count_max=RUNS_BOUND),
        # trimmed with their run (and expiring with it)
        Rule("run logs", keys.run_logs("@"), ttl_max_s=s["run_retention_s"], size_max=1000, count_max=RUNS_BOUND),
        Rule("run checkpoints", keys.run_nodes("@"), ttl_max_s=s["run_retention_s"], count_max=RUNS_BOUND),
        Rule("run results", keys.run_result("@"), ttl_max_s=RESULT_TTL_S),
        Rule("run result notifications", keys.run_result_notify("@"), ttl_max_s=RESULT_TTL_S),
        Rule("cancel index", keys.cancels, size_max=cancels),  # pruned of requests older than a day
        Rule("cancel requests", keys.cancel("@"), ttl_max_s=CANCEL_TTL_S),
        Rule("leader leases", keys.leader("@"), ttl_max_s=s["cron_lease_ms"] / 1000),
        Rule("leader epochs", keys.leader_epoch("@"), count_max=1),  # one per role (cron)
        Rule("cron job state", keys.cron_job("@"), ttl_max_s=1 + 3_600 + DAY_S, count_max=1),
        Rule("once claims", keys.once("@"), count_max=1),  # one per once=True subscriber
        Rule("conversation memory", keys.conversation("@"), ttl_max_s=conv_ttl),
        Rule("conversation deltas", keys.conversation_deltas("@"), ttl_max_s=conv_ttl),
        Rule("conversation applied ids", keys.conversation_applied("@"), ttl_max_s=conv_ttl),
        Rule("conversation locks", keys.conversation_lock("@"), ttl_max_s=30),
        Rule("conversation lock epochs", keys.conversation_lock_epoch("@"), ttl_max_s=conv_ttl),
        Rule("flow-control limits", keys.limit("*", "@", "*"), ttl_max_s=2),  # window 1 s + 1 s
        Rule("lossless topic streams", keys.topic_stream("*"), ttl_max_s=DAY_S),
    ]


def size(client: redis.Redis, key: str) -> int:
    kind = client.type(key).decode()
    command = {"stream": client.xlen, "zset": client.zcard, "hash": client.hlen, "list": client.llen,
               "set": client.scard}.get(kind)
    return int(command(key)) if command else (0 if kind == "none" else 1)


def all_keys(client: redis.Redis, keys: Keys) -> list[str]:
    found: set[str] = set()
    for pattern in keys.all_patterns:
        found.update(k.decode() for k in client.scan_iter(match=pattern, count=1000))
    return sorted(found)


def check_bounds(client: redis.Redis, keys: Keys, table: list[Rule], *,
                 sizes: bool = True) -> tuple[Counter[str], list[str]]:
    """Each key's family and whether it keeps that family's rule (``sizes=False``: only TTLs,
    for a look while work is in flight); returns the count of keys per family and the
    violations (unknown keys included)."""
    compiled = [(rule, rule.regex()) for rule in table]
    per_family: Counter[str] = Counter()
    problems: list[str] = []
    for key in all_keys(client, keys):
        rule = next((r for r, rx in compiled if rx.match(key)), None)
        if rule is None:
            problems.append(f"{key}: matches no key family (say what bounds it in RULES and the README)")
            continue
        ttl_ms = client.pttl(key)
        if ttl_ms == -2:  # expired since the SCAN saw it
            continue
        per_family[rule.family] += 1
        if rule.ttl_max_s is not None and not 0 <= ttl_ms <= rule.ttl_max_s * 1000:
            problems.append(f"{key} ({rule.family}): TTL {ttl_ms} ms, wanted one of at most {rule.ttl_max_s} s")
        if sizes and rule.size_max is not None and (n := size(client, key)) > rule.size_max:
            problems.append(f"{key} ({rule.family}): size {n}, bound {rule.size_max}")
    for rule in table:
        if sizes and rule.count_max is not None and per_family[rule.family] > rule.count_max:
            problems.append(f"{rule.family}: {per_family[rule.family]} keys, bound {rule.count_max}")
    return per_family, problems


async def workload(app, client: redis.Redis, keys: Keys, seconds: float, midway) -> Counter[str]:
    """Publish the mixed workload for ``seconds``, calling ``midway()`` once half way through;
    returns what was sent, by kind."""
    sent: Counter[str] = Counter()
    for _ in range(3):
        await app.publish("soak.once", {"n": 0})
        await app.publish("soak.plain", {"k": "later"}, delay_s=3_600)  # still delayed at the SCAN
    deadline = time.monotonic() + seconds
    half = deadline - seconds / 2
    n = 0
    while time.monotonic() < deadline:
        n += 1
        if half and time.monotonic() >= half:
            half = 0
            await midway()
        batch = [app.publish("soak.plain", {"k": f"k{i % 5}"}, idempotency_key=f"idem-{n}-{i}" if i < 3 else None)
                 for i in range(8)]
        batch += [app.publish("soak.chat", {"cid": f"hot{(n * 2 + i) % HOT_CONVERSATIONS}", "text": f"t{n}"})
                  for i in range(2)]
        batch.append(app.publish("soak.chat", {"cid": f"one-shot{n}", "text": "hello"}))
        batch += [app.publish("soak.order", {"n": n}) for _ in range(2)]
        sent.update({"plain": 8, "chat": 3, "order": 2})
        if n % 3 == 0:
            batch.append(app.publish("soak.plain", {"k": "delayed"}, delay_s=0.3))
            sent["delayed"] += 1
        await asyncio.gather(*batch)
        if n % 5 == 0:
            result = await app.run_workflow("soak-call", {"a": n, "b": 1}, timeout=30)
            assert result.succeeded
            run_id = await app.run_workflow("soak-slow", wait=False)
            await app.cancel_run(run_id, reason="soak")
            sent.update({"call": 1, "cancel": 1})
        if n % 20 == 0:
            client.xadd(keys.events, {"junk": "not an event"})  # dead-lettered at once
            sent["junk"] += 1
        await asyncio.sleep(0.15)
    return sent


def conversation_bytes(client: redis.Redis, keys: Keys) -> tuple[int, int]:
    """(conversations, total MEMORY USAGE of their keys)."""
    prefix = keys.conversation("@").split("@")[0]  # "{ns:conv:"
    conv_keys = [k for k in all_keys(client, keys) if k.startswith(prefix)]
    cids = {k[len(prefix):].split("}")[0] for k in conv_keys}
    return len(cids), sum(int(client.memory_usage(k) or 0) for k in conv_keys)


def start_producer(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli.producer", "run", "--app", APP],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_after_a_mixed_soak_every_key_family_has_a_ttl_or_stays_within_its_bound(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    keys = Keys(namespace)
    env = worker_env(subprocess_env, redis_url, namespace, **SETTINGS)
    worker = start_worker(env, tmp_path / "worker.log", app=APP)
    producers = [start_producer(env, tmp_path / f"producer{i}.log") for i in range(2)]
    procs = [worker, *producers]
    try:
        wait_until(lambda: sync_redis.hlen(keys.routes) == ROUTES and sync_redis.exists(keys.leader("cron")), 30,
                   message="the worker's routes and a cron leader")
        app = build_app("producer", redis_url=redis_url, namespace=namespace, **SETTINGS)
        live: dict[str, Counter[str]] = {}

        async def look_while_busy() -> None:  # every key known, TTLs in place, while work is in flight
            live["families"], live["problems"] = check_bounds(sync_redis, keys, rules(keys, 0), sizes=False)
            live["conversations"] = conversation_bytes(sync_redis, keys)
            memories = [await app.conversation_store.get(f"hot{i}") for i in range(HOT_CONVERSATIONS)]
            live["hot turns"] = max(m.get("turns", 0) for m in memories)

        async def publish() -> Counter[str]:
            try:
                return await workload(app, sync_redis, keys, SOAK_S, look_while_busy)
            finally:
                await app.close()

        sent = asyncio.run(publish())
        last_write = time.monotonic()
        wait_until(lambda: lag_total(sync_redis, namespace) == 0 and pending_total(sync_redis, namespace) == 0
                   and sync_redis.zcard(keys.delayed) == 3, 60, interval=0.2, message="the workload drained")
        # idle past every TTL of the soak's settings (conversations and publish markers 4 s)
        time.sleep(max(0.0, max(SETTINGS["idempotency_window_s"], SETTINGS["conversation_ttl_s"]) + 1
                       - (time.monotonic() - last_write)))
        per_family, problems = check_bounds(sync_redis, keys, rules(keys, sent["cancel"]))
        runs_indexed = sync_redis.zcard(keys.runs)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(30) for p in procs]
    finally:
        for p in procs:
            stop(p, timeout=10)
    conversations, conv_bytes = live["conversations"]
    print(f"\nsent {dict(sent)}; keys per family after the soak: {dict(per_family)}")
    print(f"half way, {conversations} live conversations held {conv_bytes} bytes ({conv_bytes / max(1, conversations):.0f}"
          f" bytes each); {runs_indexed} runs indexed of {sent['order'] + sent['chat'] + sent['call'] + sent['cancel']}"
          " started")
    print(f"keys per family half way: {dict(live['families'])}")
    assert not live["problems"], "half way:\n" + "\n".join(live["problems"])
    assert not problems, "\n".join(problems)
    assert codes == [0, 0, 0]
    # the bounds were reached, not merely respected
    assert conversations > HOT_CONVERSATIONS and sent["order"] + sent["chat"] > 3 * SETTINGS["run_records_max"]
    assert live["hot turns"] > 2, "a conversation written within its TTL keeps its memory"
    assert 0 < runs_indexed <= RUNS_BOUND
    assert not any(f.startswith("conversation") for f in per_family), "idle conversations must have expired"
    # the soak's markers expired; the cron producers' ticks (one a second) leave the last few
    assert per_family["publish markers"] <= SETTINGS["publish_dedup_ms"] // 1000 + 1, "publish markers must expire"
    assert per_family["cron job state"] == 1 and per_family["leader epochs"] == 1
    assert sync_redis.exists(keys.once(ONCE_SUBSCRIBER)) and per_family["run results"] > 0
    assert 0 < per_family["cancel requests"] <= sent["cancel"]
    assert live["families"]["flow-control limits"] > 0 and live["families"]["conversation memory"] > 0
    assert sent["plain"] + sent["chat"] + sent["order"] > 4 * 250, "the stream was trimmed, not merely short"
