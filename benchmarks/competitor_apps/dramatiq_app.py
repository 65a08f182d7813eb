"""Dramatiq: ``dramatiq benchmarks.competitor_apps.dramatiq_app --processes 1 --threads N``."""

from __future__ import annotations

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from . import COUNTER, QUEUE, REDIS_URL

broker = RedisBroker(url=REDIS_URL)
dramatiq.set_broker(broker)
_counter = redis.Redis.from_url(REDIS_URL)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop() -> None:
    _counter.incr(COUNTER)


def enqueue_one() -> None:
    noop.send()
