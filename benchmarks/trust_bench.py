"""The cost of trust and flow control per event, in µs: producing the stream fields (encode,
and sign with signing keys set) and the worker's check against the plain ones (in process);
and a route's rate limit and concurrency limit checks (one script call each, on a
redis-server the benchmark starts) against none.

``python -m benchmarks.trust_bench`` prints the numbers and writes results/trust-<time>.json."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.broker import signing
from orchestrator.broker.streams import wire_fields
from orchestrator.config import Settings
from orchestrator.events import Event, decode_fields

N = 50_000


def per_event_us(fn: Any, n: int = N) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def run() -> dict[str, Any]:
    event = Event("order.created", {"order_ref": "A-001", "items": [{"sku": "x", "qty": 2}] * 4})
    plain, signed = Settings(), Settings(signing_keys="k1=0123456789abcdef0123")
    raw_plain = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in wire_fields(event, plain).items()}
    raw_signed = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in wire_fields(event, signed).items()}
    out = {
        "produce_plain_us": per_event_us(lambda: wire_fields(event, plain)),
        "produce_signed_us": per_event_us(lambda: wire_fields(event, signed)),
        "consume_plain_us": per_event_us(lambda: (signing.check(raw_plain, plain), decode_fields(raw_plain))),
        "consume_signed_us": per_event_us(lambda: (signing.check(raw_signed, signed), decode_fields(raw_signed))),
        "body_bytes": len(raw_plain[b"body"]),
    }
    out["sign_cost_us"] = out["produce_signed_us"] - out["produce_plain_us"]
    out["check_cost_us"] = out["consume_signed_us"] - out["consume_plain_us"]
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


async def limits_cost(url: str, n: int = 3000) -> dict[str, float]:
    """µs per event of Gate.enter + leave with a rate limit, a concurrency limit, and both,
    never reached (the checks' own cost, not waiting)."""
    from orchestrator.broker.connection import create_redis
    from orchestrator.keys import Keys
    from orchestrator.runs.limits import Gate, Limits

    client = create_redis(url)
    out = {}
    try:
        for name, limits in (("rate", Limits(rate=(10**9, 1000))), ("concurrency", Limits(concurrency=10**6)),
                             ("rate_and_concurrency", Limits(rate=(10**9, 1000), concurrency=10**6))):
            gate = Gate(client, Keys("bench"), f"wf:{name}", limits, lease_ms=10_000)
            events = [Event("job", {"i": i}) for i in range(n)]
            for i, e in enumerate(events):
                e.stream_id, e.group = f"{i}-0", "workers:wf:bench"
            t0 = time.perf_counter()
            for e in events:
                assert await gate.enter(e) == 0
                await gate.leave(e)
            out[f"{name}_us"] = round((time.perf_counter() - t0) / n * 1e6, 1)
            await gate.close()
    finally:
        await client.aclose()
    return out


if __name__ == "__main__":
    import asyncio
    import tempfile

    from orchestrator.broker.embedded import EmbeddedRedis

    found = run()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        found["limits"] = asyncio.run(limits_cost(server.url))
    print(json.dumps(found, indent=2))
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    path = results / f"trust-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(found, indent=2) + "\n")
    print(f"written to {path}")
