"""Huey: ``huey_consumer benchmarks.competitor_apps.huey_app.huey -k thread -w N``."""

from __future__ import annotations

import redis
from huey import RedisHuey

from . import COUNTER, QUEUE, REDIS_URL

huey = RedisHuey(QUEUE, url=REDIS_URL, results=False)
_counter = redis.Redis.from_url(REDIS_URL)


@huey.task()
def noop() -> None:
    _counter.incr(COUNTER)


def enqueue_one() -> None:
    noop()
