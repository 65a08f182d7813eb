"""Huey with the reference handler: ``huey_consumer benchmarks.perf_peer_huey.huey -k thread -w 1``."""

from __future__ import annotations

from huey import RedisHuey

from .perf_peer_apps import QUEUE, REDIS_URL, reference_sync

huey = RedisHuey(QUEUE, url=REDIS_URL, results=False)


@huey.task()
def reference(member: str) -> None:
    reference_sync(member)


def enqueue(member: str) -> None:
    reference(member)
