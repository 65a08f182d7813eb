"""One no-op task per framework for ``benchmarks.competitors_bench``.

Every task does exactly one ``INCR`` of ``$BENCH_COUNTER`` on ``$BENCH_REDIS_URL`` so "done" is
counted the same way for tokiwa, Celery, Dramatiq and Huey. ``produce`` is the producer process.
"""

from __future__ import annotations

import os

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
COUNTER = os.environ.get("BENCH_COUNTER", "bench:competitors:done")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
