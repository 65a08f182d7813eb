"""LeaderScheduler as three real candidate processes (tests/integration/procs/leader_scheduler.py),
the leader SIGKILLed: policy ``all`` never fires a slot twice or skips one, policy ``latest``
skips only the gap before the new leader."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cron.expr import parse_slot
from orchestrator.keys import Keys

PROC = Path(__file__).resolve().parents[1] / "integration" / "procs" / "leader_scheduler.py"
TTL_MS, RENEW_MS = 1_500, 300


def start_candidates(redis_url, namespace, policy, env, ttl_ms, n=3) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, str(PROC), redis_url, namespace, policy, str(ttl_ms),
                              str(RENEW_MS)], env=env, stdout=subprocess.DEVNULL)
            for _ in range(n)]


def wait_for(predicate, timeout_s: float, step_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def leader_of(sync_redis, keys) -> str | None:
    value = sync_redis.get(keys.leader("cron"))
    return value.decode() if value else None


def run_kill_scenario(sync_redis, redis_url, namespace, policy, env, ttl_ms=TTL_MS):
    """Three candidates; SIGKILL the leader after ~3 s; stop the rest ~3 s later.
    Returns (fires sorted by slot as (slot, holder), seconds until the next leader)."""
    keys = Keys(namespace)
    procs = start_candidates(redis_url, namespace, policy, env, ttl_ms)
    try:
        first = wait_for(lambda: leader_of(sync_redis, keys), 15)
        time.sleep(3)
        victim = next(p for p in procs if f":{p.pid}:" in first)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait(5)
        wait_for(lambda: (leader_of(sync_redis, keys) or first) != first, 10, 0.01)
        takeover_s = time.monotonic() - killed_at
        time.sleep(3)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = [p.wait(10) for p in procs if p is not victim]
        assert codes == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    fires = sorted(tuple(raw.decode().split("|")) for raw in sync_redis.lrange(f"{namespace}:test:fires", 0, -1))
    buckets = [sync_redis.smembers(k) for k in sync_redis.scan_iter(f"{namespace}:test:leaders:*")]
    assert buckets, "no process ever believed it led"
    assert max(len(b) for b in buckets) == 1, "two processes believed they led in the same 100 ms"
    assert sync_redis.get(keys.leader("cron")) is None  # the last leader released on SIGTERM
    print(f"policy={policy}: {len(fires)} slots fired, next leader after {takeover_s:.2f} s")
    return fires, takeover_s


def seconds(slot: str) -> int:
    return int(parse_slot(slot).timestamp())


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_three_candidates_with_policy_all_never_fire_a_slot_twice_or_skip_one(
        sync_redis, redis_url, namespace, subprocess_env):
    fires, takeover_s = run_kill_scenario(sync_redis, redis_url, namespace, "all", subprocess_env)
    slots = [seconds(slot) for slot, _ in fires]
    assert len(slots) == len(set(slots)), "a slot fired twice"
    assert slots == list(range(slots[0], slots[0] + len(slots))), "a slot was skipped"
    assert len({holder for _, holder in fires}) >= 2
    assert takeover_s < TTL_MS / 1000 + 0.5


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_three_candidates_with_policy_latest_skip_only_the_gap_before_the_new_leader(
        sync_redis, redis_url, namespace, subprocess_env):
    """With a 2.5 s lease, at least 2.2 s pass between the last slot of the killed leader and
    the election of the next: at least two slots came due, and only the latest fires."""
    ttl_ms = 2_500
    fires, takeover_s = run_kill_scenario(sync_redis, redis_url, namespace, "latest", subprocess_env, ttl_ms)
    slots = [seconds(slot) for slot, _ in fires]
    assert len(slots) == len(set(slots)), "a slot fired twice"
    holders = [holder for _, holder in fires]
    change = next(i for i in range(1, len(holders)) if holders[i] != holders[i - 1])
    assert holders[change:] == [holders[change]] * (len(holders) - change), "leadership changed twice"
    gaps = [b - a for a, b in zip(slots, slots[1:], strict=False)]
    assert all(g == 1 for i, g in enumerate(gaps) if i != change - 1), "a hole inside a term"
    print(f"hole at the takeover: {gaps[change - 1] - 1} slot(s) not fired")
    # the new leader fired only the latest missed slot: the hole is the rest of the takeover time
    assert 2 <= gaps[change - 1] <= ttl_ms / 1000 + 2
    assert takeover_s < ttl_ms / 1000 + 0.5

