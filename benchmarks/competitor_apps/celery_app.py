"""Celery: ``celery -A benchmarks.competitor_apps.celery_app worker -Q $BENCH_QUEUE ...``."""

from __future__ import annotations

import os

import redis
from celery import Celery

from . import COUNTER, QUEUE, REDIS_URL

app = Celery("tokiwa_bench", broker=REDIS_URL)
app.conf.update(
    task_ignore_result=True,
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "4")),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
_counter = redis.Redis.from_url(REDIS_URL)


@app.task(name="bench.noop")
def noop() -> None:
    _counter.incr(COUNTER)


def enqueue_one() -> None:
    noop.delay()
