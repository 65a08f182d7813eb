"""The cost of signed envelopes per event: producing the stream fields (encode, and sign with
signing keys set) and the worker's check, in µs, against the plain ones. In-process, no Redis.

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


if __name__ == "__main__":
    found = run()
    print(json.dumps(found, indent=2))
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    path = results / f"trust-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(found, indent=2) + "\n")
    print(f"written to {path}")
