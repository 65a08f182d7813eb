"""A real fleet: worker processes with different registrations ("versions" of one app) on one
Redis. Each registration reads the stream through its own consumer group, so a worker never
acks what it cannot run, and each registration's runs happen once whatever the mix.

Every test counts processed, lost, duplicated and stuck, and bounds its own time."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import redis

from orchestrator.events import Event, encode_fields
from tests.faults.apps import whole_lines
from tests.groups import group, groups
from tests.integration.procs import start_worker, stop, wait_until, worker_env

FLEET_APP = "tests.faults.fleet_app:app"


def start(base_env: dict[str, str], url: str, namespace: str, out: Path, log: Path, workflows: str,
          *args: str, **settings: object) -> object:
    env = worker_env(base_env, url, namespace, TEST_OUT=out, TEST_WORKFLOWS=workflows, block_ms=100,
                     heartbeat_interval_s=0.5, **settings)
    return start_worker(env, log, *args, app=FLEET_APP)


def runs(out: Path) -> dict[str, Counter]:
    """workflow -> Counter of i -> successful runs, from the lines the workers wrote."""
    found: dict[str, Counter] = {}
    if not out.exists():
        return found
    for line in whole_lines(out):
        name, i, _pid, status = line.split()[:4]
        if status == "ok":
            found.setdefault(name, Counter())[int(i)] += 1
    return found


def publish_raw(client: redis.Redis, namespace: str, start: int, count: int) -> list[str]:
    """What a producer without the app does: XADD ``job`` events."""
    pipe = client.pipeline(transaction=False)
    for i in range(start, start + count):
        pipe.xadd(f"{{{namespace}:0}}:events", encode_fields(Event("job", {"i": i})))
    return [x.decode() for x in pipe.execute()]


def groups_exist(client: redis.Redis, namespace: str, *routes: str) -> bool:
    names = groups(client, namespace)
    return all(group(r) in names for r in routes)


def inspect_groups(redis_url: str, namespace: str) -> dict[str, dict]:
    """``tokiwa-producer inspect groups --json`` as a real process, by group."""
    import json
    import subprocess
    import sys

    from tests.integration.procs import ROOT
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "inspect", "groups", "--json",
                           "--redis-url", redis_url, "--namespace", namespace], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {row["group"]: row for row in json.loads(done.stdout)}


def live_groups(client: redis.Redis, namespace: str, pid: int) -> list[str] | None:
    """The groups the heartbeat of worker ``pid`` says it reads (None before its first beat)."""
    import msgpack
    for blob in client.hgetall(f"{namespace}:workers").values():
        beat = msgpack.unpackb(blob, raw=False)
        if beat.get("pid") == pid:
            return beat.get("groups")
    return None


def test_a_mixed_fleet_runs_every_registration_once_and_a_worker_without_it_swallows_nothing(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    """A registers fleet-x and fleet-y, B fleet-x, C nothing; 300 events of a producer without
    the app: fleet-x and fleet-y each run every event once, C never touches one."""
    out = tmp_path / "runs.txt"
    a = start(subprocess_env, redis_url, namespace, out, tmp_path / "a.log", "fleet-x,fleet-y")
    b = start(subprocess_env, redis_url, namespace, out, tmp_path / "b.log", "fleet-x")
    c = start(subprocess_env, redis_url, namespace, out, tmp_path / "c.log", "")
    procs = [a, b, c]
    try:
        wait_until(lambda: groups_exist(sync_redis, namespace, "wf:fleet-x", "wf:fleet-y"), 20, message="groups")
        wait_until(lambda: live_groups(sync_redis, namespace, c.pid) is not None, 20, message="C's heartbeat")
        total = 300
        t0 = time.monotonic()
        for start_at in range(0, total, 50):
            publish_raw(sync_redis, namespace, start_at, 50)
            time.sleep(0.05)
        wait_until(lambda: len(runs(out).get("fleet-x", ())) == total and len(runs(out).get("fleet-y", ())) == total,
                   60, message="every event run by fleet-x and fleet-y")
        took = time.monotonic() - t0
        pids = {line.split()[2] for line in whole_lines(out)}
        info = groups(sync_redis, namespace)
        assert live_groups(sync_redis, namespace, c.pid) == [], "C reads no group"
    finally:
        codes = [stop(p) for p in procs]
    counted = runs(out)
    for name in ("fleet-x", "fleet-y"):
        lost = set(range(total)) - set(counted[name])
        duplicated = sum(n - 1 for n in counted[name].values())
        print(f"{name}: {len(counted[name])} run, {len(lost)} lost, {duplicated} duplicated")
        assert lost == set() and duplicated == 0
    assert str(c.pid) not in pids, "the worker without the workflows ran something"
    stuck = {g: (int(r["pending"]), int(r.get("lag") or 0)) for g, r in info.items()}
    assert stuck == {group("wf:fleet-x"): (0, 0), group("wf:fleet-y"): (0, 0)}, stuck
    print(f"{total} events x 2 registrations in {took:.2f}s; by pid: {Counter(line.split()[2] for line in whole_lines(out))}")
    assert codes == [0, 0, 0]


def test_a_rolling_deploy_under_continuous_publishing_loses_nothing(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    """Two workers of version 1 (fleet-x, fleet-y) are replaced one by one by version 2
    (fleet-x, fleet-z) while a producer without the app publishes continuously. fleet-x runs
    every event once; fleet-z runs every event from its first declaration on, once; the
    fleet-y events published after the last v1 worker left wait in fleet-y's group (visible,
    not lost) and run once a v1 worker comes back."""
    out = tmp_path / "runs.txt"
    v1 = [start(subprocess_env, redis_url, namespace, out, tmp_path / f"v1-{n}.log", "fleet-x,fleet-y",
                TEST_SLEEP_MS=5) for n in range(2)]
    procs = list(v1)
    published: list[tuple[int, str]] = []
    done = threading.Event()

    def producer() -> None:
        client = redis.Redis.from_url(redis_url)
        i = 0
        while not done.is_set():
            for sid in publish_raw(client, namespace, i, 5):
                published.append((i, sid))
                i += 1
            time.sleep(0.05)
        client.close()

    thread = threading.Thread(target=producer, daemon=True)
    try:
        wait_until(lambda: groups_exist(sync_redis, namespace, "wf:fleet-x", "wf:fleet-y"), 20, message="v1 groups")
        thread.start()
        time.sleep(1.0)
        z_from = None
        for n, old in enumerate(v1):  # replace each v1 worker by a v2 worker
            new = start(subprocess_env, redis_url, namespace, out, tmp_path / f"v2-{n}.log", "fleet-x,fleet-z",
                        TEST_SLEEP_MS=5)
            procs.append(new)
            wait_until(lambda: groups_exist(sync_redis, namespace, "wf:fleet-z"), 20, message="fleet-z's group")
            if z_from is None:
                z_from = len(published)  # every event from here on was published after fleet-z existed
            time.sleep(0.7)
            assert stop(old) == 0
            time.sleep(0.7)
        time.sleep(1.0)
        done.set()
        thread.join(10)
        total = len(published)
        wait_until(lambda: len(runs(out).get("fleet-x", ())) == total, 60, message="fleet-x caught up")
        wait_until(lambda: set(range(z_from, total)) <= set(runs(out).get("fleet-z", ())), 60,
                   message="fleet-z caught up")
        y_group = groups(sync_redis, namespace)[group("wf:fleet-y")]
        y_done = set(runs(out).get("fleet-y", ()))
        waiting = int(y_group.get("lag") or 0) + int(y_group["pending"])
        print(f"{total} events; fleet-y ran {len(y_done)}, {waiting} wait in its group with no worker")
        assert waiting > 0, "no fleet-y event was left waiting: the deploy did not drop fleet-y"
        assert len(y_done) + waiting == total, "a fleet-y event vanished"
        shown = inspect_groups(redis_url, namespace)  # what an operator sees
        assert shown[group("wf:fleet-y")]["waiting"] is True and shown[group("wf:fleet-y")]["live_workers"] == 0
        assert shown[group("wf:fleet-x")]["live_workers"] == 2 and shown[group("wf:fleet-z")]["kind"] == "workflow"
        # a v1 worker comes back: the waiting fleet-y events run, once
        back = start(subprocess_env, redis_url, namespace, out, tmp_path / "v1-back.log", "fleet-y")
        procs.append(back)
        wait_until(lambda: len(runs(out).get("fleet-y", ())) == total, 60, message="fleet-y's backlog")
    finally:
        done.set()
        codes = [stop(p) for p in procs]
    counted = runs(out)
    report = {}
    for name, expected in (("fleet-x", set(range(total))), ("fleet-y", set(range(total))),
                           ("fleet-z", set(range(z_from, total)))):
        got = counted.get(name, Counter())
        lost = expected - set(got)
        duplicated = sum(n - 1 for n in got.values())
        report[name] = (len(got), len(lost), duplicated)
        assert lost == set(), f"{name} lost {sorted(lost)[:10]}"
        assert duplicated == 0, f"{name} ran {duplicated} events twice"
    z_first = min(counted["fleet-z"])
    assert set(counted["fleet-z"]) == set(range(z_first, total)), "fleet-z ran a gap"
    stuck = {g: (int(r["pending"]), int(r.get("lag") or 0)) for g, r in groups(sync_redis, namespace).items()}
    print(f"(runs, lost, duplicated): {report}; fleet-z from event {z_first} (declared at {z_from}); stuck {stuck}")
    assert all(v == (0, 0) for v in stuck.values()), stuck
    assert all(code == 0 for code in codes[2:]), codes


def test_two_workflows_on_one_event_keep_their_own_delivery_state(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    """fleet-fail fails every event's first delivery under ack_policy on_success: its events
    are redelivered to it alone; fleet-x, triggered by the same events, runs each once."""
    out = tmp_path / "runs.txt"
    w = start(subprocess_env, redis_url, namespace, out, tmp_path / "w.log", "fleet-x,fleet-fail",
              ack_policy="on_success", redelivery_backoff_ms=50)
    try:
        wait_until(lambda: groups_exist(sync_redis, namespace, "wf:fleet-x", "wf:fleet-fail"), 20, message="groups")
        publish_raw(sync_redis, namespace, 0, 40)
        wait_until(lambda: len(runs(out).get("fleet-fail", ())) == 40, 60, message="fleet-fail's redeliveries")
        wait_until(lambda: len(runs(out).get("fleet-x", ())) == 40, 30, message="fleet-x")
    finally:
        code = stop(w)
    counted = runs(out)
    failures = sum(1 for line in whole_lines(out) if line.endswith(" fail"))
    assert failures == 40
    assert sorted(counted["fleet-x"].values()) == [1] * 40, "fleet-x ran an event again for fleet-fail's failure"
    assert sorted(counted["fleet-fail"].values()) == [1] * 40
    assert code == 0


def test_events_published_before_any_worker_are_run_by_every_registration(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    """No group exists yet: the first worker creates its groups from the stream's start."""
    out = tmp_path / "runs.txt"
    publish_raw(sync_redis, namespace, 0, 30)
    w = start(subprocess_env, redis_url, namespace, out, tmp_path / "w.log", "fleet-x,fleet-y")
    try:
        wait_until(lambda: all(len(runs(out).get(x, ())) == 30 for x in ("fleet-x", "fleet-y")), 30,
                   message="the backlog")
    finally:
        assert stop(w) == 0
    assert all(sorted(c.values()) == [1] * 30 for c in runs(out).values())


def chat_turns(out: Path) -> dict[str, list[tuple[int, float, float, str]]]:
    """conversation -> [(seq, start, end, pid)] in start order, from fleet-chat's lines."""
    found: dict[str, list[tuple[int, float, float, str]]] = {}
    for line in whole_lines(out):
        name, what, pid, span = line.split()[:4]
        if name != "fleet-chat":
            continue
        conv, seq = what.rsplit(":", 1)
        start, end = (float(x) for x in span.split(":"))
        found.setdefault(conv, []).append((int(seq), start, end, pid))
    return {c: sorted(v, key=lambda t: t[1]) for c, v in found.items()}


def test_conversation_order_holds_for_a_producer_without_the_app(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    """Three workers run the chatflow fleet-chat (conversation key = payload path ``conv``);
    ``tokiwa-producer publish --file`` without --app publishes 5 conversations x 60 turns,
    interleaved: every turn runs once, in publish order, never two of one conversation at once."""
    import json
    import subprocess
    import sys

    from tests.integration.procs import ROOT

    out = tmp_path / "runs.txt"
    workers = [start(subprocess_env, redis_url, namespace, out, tmp_path / f"w{n}.log", "", "--concurrency", "8",
                     TEST_EXTRAS=1) for n in range(3)]
    convs, turns = [f"c{n}" for n in range(5)], 60
    lines = [json.dumps({"type": "chat.msg", "payload": {"conv": c, "seq": s}}) for s in range(turns) for c in convs]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    try:
        wait_until(lambda: groups_exist(sync_redis, namespace, "wf:fleet-chat")
                   and all(live_groups(sync_redis, namespace, w.pid) for w in workers), 30, message="the workers")
        t0 = time.monotonic()
        env = {k: v for k, v in subprocess_env.items() if not k.startswith("TOKIWA_")}
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "publish", "--file", str(tmp_path / "chat.jsonl"),
                               "--batch", "7", "--redis-url", redis_url, "--namespace", namespace, "--no-progress"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {"published": len(lines)}
        wait_until(lambda: sum(len(v) for v in chat_turns(out).values()) >= len(lines), 90, message="every turn")
        took = time.monotonic() - t0
    finally:
        codes = [stop(w) for w in workers]
    seen = chat_turns(out)
    out_of_order = overlaps = duplicated = 0
    for conv in convs:
        rows = seen[conv]
        seqs = [r[0] for r in rows]
        duplicated += len(seqs) - len(set(seqs))
        out_of_order += sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b < a)
        overlaps += sum(1 for a, b in zip(rows, rows[1:], strict=False) if b[1] < a[2])
    lost = sum(turns - len(set(r[0] for r in seen.get(c, []))) for c in convs)
    hosts = Counter(r[3] for rows in seen.values() for r in rows)
    print(f"{len(lines)} turns in {took:.2f}s over pids {dict(hosts)}: {lost} lost, {duplicated} duplicated, "
          f"{out_of_order} out of order, {overlaps} overlaps")
    assert (lost, duplicated, out_of_order, overlaps) == (0, 0, 0, 0)
    assert len(hosts) >= 2, "one worker did everything: the test proves nothing about a fleet"
    assert codes == [0, 0, 0]


def test_glob_subscriptions_and_triggers_on_worker_processes(redis_url, namespace, sync_redis, subprocess_env,
                                                            tmp_path):
    """``order.*``: a subscriber and a workflow on two workers take order.created and order.paid
    (each once), never refund.issued."""
    out = tmp_path / "runs.txt"
    workers = [start(subprocess_env, redis_url, namespace, out, tmp_path / f"w{n}.log", "", TEST_GLOB=1)
               for n in range(2)]
    try:
        wait_until(lambda: groups_exist(sync_redis, namespace, "sub:fleet.glob", "wf:fleet-glob-wf"), 20,
                   message="groups")
        pipe = sync_redis.pipeline(transaction=False)
        for i in range(30):
            etype = ("order.created", "order.paid", "refund.issued")[i // 10]
            pipe.xadd(f"{{{namespace}:0}}:events", encode_fields(Event(etype, {"i": i})))
        pipe.execute()
        wait_until(lambda: all(len(runs(out).get(n, ())) == 20 for n in ("fleet-glob", "fleet-glob-wf")), 30,
                   message="the order.* events")
        time.sleep(0.3)
    finally:
        codes = [stop(w) for w in workers]
    counted = runs(out)
    assert dict(counted["fleet-glob"]) == {i: 1 for i in range(20)}
    assert dict(counted["fleet-glob-wf"]) == {i: 1 for i in range(20)}
    assert codes == [0, 0]


def test_rate_and_concurrency_limits_hold_across_three_workers(redis_url, namespace, sync_redis, subprocess_env,
                                                               tmp_path):
    """fleet-limited: at most 50 starts in any second, at most 3 at once per tenant, across
    three workers; nothing lost or run twice; the waits show in a worker's metrics."""
    import urllib.request

    from orchestrator.broker.embedded import free_port

    out = tmp_path / "runs.txt"
    port = free_port()
    workers = [start(subprocess_env, redis_url, namespace, out, tmp_path / f"w{n}.log", "", "--concurrency", "8",
                     *(("--metrics-port", str(port)) if n == 0 else ()), TEST_LIMITED=1) for n in range(3)]
    total = 200
    try:
        wait_until(lambda: groups_exist(sync_redis, namespace, "wf:fleet-limited")
                   and all(live_groups(sync_redis, namespace, w.pid) for w in workers), 30, message="the workers")
        pipe = sync_redis.pipeline(transaction=False)
        for i in range(total):
            pipe.xadd(f"{{{namespace}:0}}:events", encode_fields(Event("limited", {"i": i, "tenant": f"t{i % 2}"})))
        pipe.execute()
        t0 = time.monotonic()
        wait_until(lambda: len(runs_limited(out)) >= total, 60, message="every limited run")
        took = time.monotonic() - t0
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        codes = [stop(w) for w in workers]
    rows = runs_limited(out)
    ids = [r[0] for r in rows]
    starts = sorted(r[1] for r in rows)
    # starts are stamped by the node, a few ms after its place was taken on Redis's clock: a
    # window 200 ms shorter than the limit's absorbs that jitter
    busiest = max(sum(1 for s in starts if t <= s < t + 0.8) for t in starts)
    most_at_once = {}
    for tenant in ("t0", "t1"):
        spans = [(r[1], r[2]) for r in rows if r[3] == tenant]
        most_at_once[tenant] = max(sum(1 for a, b in spans if a <= s < b) for s, _ in spans)
    waits = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("tokiwa_limit_waits_total"))
    hosts = Counter(r[4] for r in rows)
    print(f"{total} limited runs in {took:.2f}s over {dict(hosts)}: busiest 0.8 s {busiest} starts, "
          f"most at once per tenant {most_at_once}, waits seen by one worker {waits:.0f}")
    assert sorted(ids) == list(range(total)), "lost or duplicated"
    assert busiest <= 50, f"{busiest} starts within 0.8 s"
    assert max(most_at_once.values()) <= 3, most_at_once
    assert took >= (total - 50) / 50 - 0.5, "faster than the rate limit allows"
    assert waits > 0, "the waits are not visible in the metrics"
    assert len(hosts) >= 2
    assert codes == [0, 0, 0]


def runs_limited(out: Path) -> list[tuple[int, float, float, str, str]]:
    """(i, start, end, tenant, pid) of every fleet-limited run."""
    found = []
    for line in whole_lines(out):
        name, i, pid, span = line.split()[:4]
        if name == "fleet-limited":
            start_s, end_s, tenant = span.split(":")
            found.append((int(i), float(start_s), float(end_s), tenant, pid))
    return found
