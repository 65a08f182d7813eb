"""``make bench``: run every benchmark on a fresh embedded redis-server, print a table and
write ``benchmarks/results/<utc time>.json`` (and ``latest.json``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from orchestrator.broker.embedded import EmbeddedRedis

from . import broker_bench

RESULTS = Path(__file__).resolve().parent / "results"


def _suites() -> dict:
    suites = {"broker": broker_bench.run}
    for name, module in (("workflow", "workflow_bench"), ("chatflow", "chatflow_bench"),
                         ("relay", "relay_bench"), ("faults", "faults_bench"), ("links", "links_bench"), ("delay", "delay_bench"),
                         ("fleet", "fleet_bench"), ("perf", "perf_bench")):
        try:
            mod = __import__(f"benchmarks.{module}", fromlist=["run"])
            suites[name] = mod.run
        except ImportError:
            pass
    return suites


def _rows(prefix: str, value, out: list) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _rows(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out.append((prefix, value))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="suites to run (broker workflow chatflow relay faults links "
                                                  "delay fleet perf)")
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    results = {"machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count(),
                           "platform": platform.platform()}, "started": time.time()}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        for name, fn in _suites().items():
            if args.only and name not in args.only:
                continue
            kwargs = {"n": args.events} if name == "broker" else {}
            print(f"== {name}", flush=True)
            try:
                results[name] = asyncio.run(fn(server.url, **kwargs)) if asyncio.iscoroutinefunction(fn) \
                    else fn(server.url, **kwargs)
            except Exception as exc:  # one broken suite must not lose the others' rows
                traceback.print_exc()
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    rows: list = []
    for name in results:
        if name not in ("machine", "started"):
            _rows(name, results[name], rows)
    width = max(len(r[0]) for r in rows)
    for key, value in rows:
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown:>14}")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for path in (RESULTS / f"{stamp}.json", RESULTS / "latest.json"):
        path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {RESULTS / (stamp + '.json')}")


if __name__ == "__main__":
    main()
