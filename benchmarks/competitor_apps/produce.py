"""The producer process: ``python -m benchmarks.competitor_apps.produce FRAMEWORK N [--batch]``.

Sends one untimed message (opens connections), then ``N`` timed ones with the framework's
normal enqueue API, and prints ``{"seconds": ..., "sent": N + 1}`` as JSON on stdout.
tokiwa sends with ``publish_sync`` (the others' enqueue calls are synchronous too);
``--async`` uses the asyncio ``publish`` instead, ``--batch`` uses ``publish_many`` (500 per
call); the others have no official batch call.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import time

from . import REDIS_URL

FRAMEWORKS = ("tokiwa", "celery", "dramatiq", "huey")


def _tokiwa_sync(n: int) -> float:
    from orchestrator import Orchestrator

    producer = Orchestrator(REDIS_URL, mode="producer")
    producer.publish_sync("bench.noop", None)
    t0 = time.perf_counter()
    for _ in range(n):
        producer.publish_sync("bench.noop", None)
    return time.perf_counter() - t0


async def _tokiwa(n: int, batch: bool) -> float:
    from orchestrator import Event, Orchestrator

    producer = Orchestrator(REDIS_URL, mode="producer")
    await producer.connect()
    try:
        await producer.publish("bench.noop", None)
        t0 = time.perf_counter()
        if batch:
            for start in range(0, n, 500):
                await producer.publish_many([Event("bench.noop", None) for _ in range(min(500, n - start))])
        else:
            for _ in range(n):
                await producer.publish("bench.noop", None)
        return time.perf_counter() - t0
    finally:
        await producer.close()


def _sync(framework: str, n: int) -> float:
    enqueue = importlib.import_module(f"benchmarks.competitor_apps.{framework}_app").enqueue_one
    enqueue()
    t0 = time.perf_counter()
    for _ in range(n):
        enqueue()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("framework", choices=FRAMEWORKS)
    parser.add_argument("n", type=int)
    parser.add_argument("--batch", action="store_true")
    parser.add_argument("--async", dest="use_async", action="store_true")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("n must be >= 1")
    if args.framework == "tokiwa" and not (args.batch or args.use_async):
        seconds = _tokiwa_sync(args.n)
    elif args.framework == "tokiwa":
        seconds = asyncio.run(_tokiwa(args.n, args.batch))
    else:
        seconds = _sync(args.framework, args.n)
    print(json.dumps({"seconds": seconds, "sent": args.n + 1}))


if __name__ == "__main__":
    main()
