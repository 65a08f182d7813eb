"""Helper process for tests/faults/test_leader_processes.py (not a test module).

Runs a LeaderElector + LeaderScheduler with a 6-field every-second job. Records into Redis,
under ``<namespace>:test:*``:
- ``fires`` (list): ``<slot>|<holder>`` for every slot this process fired;
- ``leaders:<decisecond>`` (set): the holders that believed they led during that 100 ms.
Exits 0 on SIGTERM after a graceful stop (releasing leadership).

usage: leader_scheduler.py REDIS_URL NAMESPACE POLICY TTL_MS RENEW_MS
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import redis.asyncio as aioredis

from orchestrator.cron.expr import slot_iso
from orchestrator.cron.scheduler import LeaderScheduler
from orchestrator.keys import Keys
from orchestrator.leader import LeaderElector


async def main(url: str, namespace: str, policy: str, ttl_ms: int, renew_ms: int) -> int:
    redis = aioredis.Redis.from_url(url)
    keys = Keys(namespace)
    elector = LeaderElector(redis, keys, "cron", ttl_ms=ttl_ms, renew_ms=renew_ms, retry_ms=100)
    sched = LeaderScheduler(elector, redis, keys, missed_policy=policy, missed_window_s=600, tz="UTC")
    fires = f"{namespace}:test:fires"

    async def tick(job_name: str, slot) -> None:
        await redis.rpush(fires, f"{slot_iso(slot)}|{elector.holder_id}")

    sched.add_job("* * * * * *", "every-second", tick)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await sched.start()
    print(f"READY {elector.holder_id}", flush=True)
    try:
        while not stop.is_set():
            if elector.is_leader:
                bucket = f"{namespace}:test:leaders:{int(time.time() * 10)}"
                await redis.sadd(bucket, elector.holder_id)
                await redis.expire(bucket, 300)
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except TimeoutError:
                pass
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        await sched.stop()
        await redis.aclose()
    return 0


if __name__ == "__main__":
    url, ns, policy, ttl, renew = sys.argv[1:6]
    sys.exit(asyncio.run(main(url, ns, policy, int(ttl), int(renew))))
