"""Dramatiq with the reference handler: ``dramatiq benchmarks.perf_peer_dramatiq --processes 2 --threads 8``."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from .perf_peer_apps import QUEUE, REDIS_URL, reference_sync

broker = RedisBroker(url=REDIS_URL)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def reference(member: str) -> None:
    reference_sync(member)


def enqueue(member: str) -> None:
    reference.send(member)
