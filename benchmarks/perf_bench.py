"""The perf suite: every row with its baseline in the same run, quoted as ratios.

``python -m benchmarks.perf_bench [--quick] [--profile LABEL] [--only ROWS]`` starts its own
redis-server on a free loopback port and writes ``benchmarks/results/perf-<UTC time>.json``;
``make bench`` runs it as the ``perf`` suite. Rows (each against its baseline):

- ``noop``: one worker process (``tokiwa-worker run --concurrency 64``), 20,000 events queued
  while it is stopped (SIGSTOP), timed from SIGCONT until its group has nothing pending or
  undelivered; worker CPU per event from ``/proc/<pid>/stat``. Baseline: the raw redis-py loop
  (XREADGROUP COUNT 500 + one XACK per batch) on the same entries;
- ``reference``: the reference handler (one pipelined round trip on its own redis.asyncio
  client: INCR + two ZADD) in the worker. Baselines: the same handler run bare from 64
  asyncio tasks, and Dramatiq (2 processes x 8 threads) and Huey (1 thread) with the same
  handler (``benchmarks.perf_peers``);
- extra rows: the worker on uvloop; the reference handler through the shared AutoPipeline
  (in the worker and bare);
- ``latency``: 500 events published one at a time at random intervals (1-5 ms) to an idle
  worker; the handler records ``time.time() - published_at`` at its start; p50 / p99;
- ``chatflow``: chatflow events over 1,000 conversations with two workers against plain
  events (the same INCR) with two workers at the same concurrency;
- ``relay``: remote topic messages at 10,000 msgs/s from four children (``perf_relay``);
- ``idle_rss``: the no-op worker's RSS after it started and idled for a second.

With ``--profile LABEL`` it also runs py-spy on the worker during an extra no-op, reference
and chatflow round and writes ``results/profiles/LABEL-<case>.txt`` (``perf_profile``; the
raw stacks stay in the temp dir, :data:`RAW_PROFILES`).
Nothing here is asserted by the test suite: speed is measured, not tested.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .perf_rows import (
    CONCURRENCY,
    bare_reference,
    latency,
    raw_loop,
    two_workers,
    worker_rounds,
)

RESULTS = Path(__file__).resolve().parent / "results"
CONVERSATIONS, PER_CONVERSATION = 1000, 10  # the chatflow row: 10,000 events


# -- the suite -------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


#: py-spy's raw collapsed stacks (megabytes; the text summaries go to results/profiles/)
RAW_PROFILES = Path(tempfile.gettempdir()) / "tokiwa-perf-profiles"


def _profiler(label: str | None, case: str) -> Any:
    """A ``profile(pid)`` factory writing ``RAW_PROFILES/<label>-<case>.stacks``, or None."""
    if not label:
        return None
    from .perf_proc import Profiler

    return lambda pid: Profiler(pid, RAW_PROFILES / f"{label}-{case}.stacks")


def _write_summaries(label: str | None) -> None:
    """``results/profiles/<label>-<case>.txt`` from each raw profile of ``label``."""
    if not label:
        return
    from .perf_profile import summarize

    folder = RESULTS / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    for stacks in sorted(RAW_PROFILES.glob(f"{label}-*.stacks")):
        text = summarize(stacks.read_text(), f"{stacks.stem} (py-spy, worker pid)")
        (folder / f"{stacks.stem}.txt").write_text(text + "\n")
    print(f"profiles: {folder}/{label}-*.txt (raw stacks in {RAW_PROFILES})")


def _noop_row(url: str, n: int, rounds: int, profile: str | None, uv: bool) -> dict[str, Any]:
    raw = asyncio.run(raw_loop(url, n, rounds))
    noop = asyncio.run(worker_rounds(url, "benchmarks.perf_apps:noop", n, rounds,
                                     profile=_profiler(profile, "noop"), profile_events=10 * n))
    row: dict[str, Any] = {"raw_loop": raw, "tokiwa": noop, "cpu_us_per_event": noop["cpu_us_per_event"],
                           "rate_vs_raw": _ratio(noop["per_s"], raw["per_s"])}
    if uv:
        row["tokiwa_uvloop"] = asyncio.run(worker_rounds(url, "benchmarks.perf_apps:noop", n, rounds,
                                                         loop="uvloop"))
        row["uvloop_rate_vs_raw"] = _ratio(row["tokiwa_uvloop"]["per_s"], raw["per_s"])
    return row


def _reference_row(url: str, n: int, rounds: int, profile: str | None, uv: bool) -> dict[str, Any]:
    app, app_ap = "benchmarks.perf_apps:reference", "benchmarks.perf_apps:reference_autopipe"
    bare = bare_reference(url, n, rounds)
    ours = asyncio.run(worker_rounds(url, app, n, rounds, profile=_profiler(profile, "reference"),
                                     profile_events=2 * n))
    ap = asyncio.run(worker_rounds(url, app_ap, n, rounds, profile=_profiler(profile, "reference_autopipe"),
                                   profile_events=2 * n))
    row: dict[str, Any] = {
        "bare_64_tasks": bare, "tokiwa": ours, "rate_vs_bare": _ratio(ours["per_s"], bare["per_s"]),
        "added_cpu_us_per_event": ours["cpu_us_per_event"] - bare["cpu_us_per_event"],
        "tokiwa_autopipe": ap, "bare_autopipe": bare_reference(url, n, rounds, autopipe=True),
        "autopipe_rate_vs_bare": _ratio(ap["per_s"], bare["per_s"])}
    if uv:
        row["tokiwa_uvloop"] = asyncio.run(worker_rounds(url, app, n, rounds, loop="uvloop"))
        row["bare_uvloop"] = bare_reference(url, n, rounds, loop="uvloop")
        row["uvloop_rate_vs_bare"] = _ratio(row["tokiwa_uvloop"]["per_s"], bare["per_s"])
        row["tokiwa_autopipe_uvloop"] = asyncio.run(worker_rounds(url, app_ap, n, rounds, loop="uvloop"))
    return row


def _peers_row(url: str, n: int, reference: dict[str, Any] | None) -> dict[str, Any]:
    from . import perf_peers

    peers = perf_peers.run(url, n)
    fastest = max((p["per_s"] for p in peers.values() if "per_s" in p), default=None)
    row: dict[str, Any] = {**peers, "fastest_peer_per_s": fastest}
    for name in ("tokiwa", "tokiwa_autopipe", "tokiwa_uvloop", "tokiwa_autopipe_uvloop"):
        if reference and name in reference:
            row[f"{name}_vs_fastest_peer"] = _ratio(reference[name]["per_s"], fastest)
    return row


def _chatflow_row(url: str, profile: str | None) -> dict[str, Any]:
    chat = asyncio.run(two_workers(url, "chat", CONVERSATIONS, PER_CONVERSATION))
    plain = asyncio.run(two_workers(url, "plain", CONVERSATIONS, PER_CONVERSATION))
    if profile:
        asyncio.run(two_workers(url, "chat", CONVERSATIONS, PER_CONVERSATION, profile=_profiler(profile, "chatflow")))
    return {"chat": chat, "plain": plain, "chat_vs_plain": _ratio(chat["per_s"], plain["per_s"])}


ROWS = ("noop", "reference", "peers", "latency", "chatflow", "relay")


def run(url: str, *, n: int = 20_000, rounds: int = 3, profile: str | None = None,
        only: tuple[str, ...] = (), peer_events: int | None = None) -> dict[str, Any]:
    """Every row of the suite (``only``: some of :data:`ROWS`); ``profile`` is the label of
    py-spy summaries to write (None: no profiling)."""
    uv = _has_uvloop()
    out: dict[str, Any] = {"events": n, "concurrency": CONCURRENCY, "uvloop_installed": uv}
    for name in ROWS:
        if only and name not in only:
            continue
        print(f"-- {name}", flush=True)
        if name == "noop":
            out["noop"] = _noop_row(url, n, rounds, profile, uv)
            out["idle_rss_mb"] = out["noop"]["tokiwa"]["idle_rss_mb"]
            if uv:
                out["idle_rss_mb_uvloop"] = out["noop"]["tokiwa_uvloop"]["idle_rss_mb"]
        elif name == "reference":
            out["reference"] = _reference_row(url, n, max(1, rounds - 1), profile, uv)
        elif name == "peers":
            out["peers"] = _peers_row(url, peer_events or n, out.get("reference"))
        elif name == "latency":
            out["latency"] = asyncio.run(latency(url))
            if uv:
                out["latency_uvloop"] = asyncio.run(latency(url, loop="uvloop"))
        elif name == "chatflow":
            out["chatflow"] = _chatflow_row(url, profile)
        else:
            from . import perf_relay

            out["relay"] = perf_relay.run(url)
    _write_summaries(profile)
    return out


def table(result: dict[str, Any]) -> str:
    """The rows as the issue quotes them: value, baseline, ratio, target."""
    def f(v: Any, d: int = 0) -> str:
        return "-" if v is None else f"{v:,.{d}f}"

    lines = []
    noop = result.get("noop")
    if noop:
        lines.append(f"no-op: {f(noop['cpu_us_per_event'], 1)} us CPU/event (target <= 12); "
                     f"{f(noop['tokiwa']['per_s'])}/s vs raw loop {f(noop['raw_loop']['per_s'])}/s = "
                     f"{f(noop['rate_vs_raw'], 2)} (target >= 0.50)")
        if "tokiwa_uvloop" in noop:
            u = noop["tokiwa_uvloop"]
            lines.append(f"  uvloop: {f(u['cpu_us_per_event'], 1)} us/event, {f(u['per_s'])}/s = "
                         f"{f(noop['uvloop_rate_vs_raw'], 2)} of raw")
    ref = result.get("reference")
    if ref:
        lines.append(f"reference: {f(ref['tokiwa']['per_s'])}/s ({f(ref['tokiwa']['cpu_us_per_event'])} us) vs bare "
                     f"{f(ref['bare_64_tasks']['per_s'])}/s ({f(ref['bare_64_tasks']['cpu_us_per_event'])} us) = "
                     f"{f(ref['rate_vs_bare'], 2)} (target >= 0.90); adds {f(ref['added_cpu_us_per_event'])} us/event")
        lines.append(f"  autopipe: worker {f(ref['tokiwa_autopipe']['per_s'])}/s "
                     f"({f(ref['tokiwa_autopipe']['cpu_us_per_event'])} us) = {f(ref['autopipe_rate_vs_bare'], 2)} "
                     f"of bare; bare autopipe {f(ref['bare_autopipe']['per_s'])}/s")
        if "tokiwa_uvloop" in ref:
            lines.append(f"  uvloop: worker {f(ref['tokiwa_uvloop']['per_s'])}/s = {f(ref['uvloop_rate_vs_bare'], 2)}"
                         f" of bare asyncio; bare uvloop {f(ref['bare_uvloop']['per_s'])}/s; autopipe + uvloop "
                         f"{f(ref['tokiwa_autopipe_uvloop']['per_s'])}/s")
    peers = result.get("peers")
    if peers:
        for name in ("dramatiq", "huey"):
            p = peers.get(name, {})
            lines.append(f"  {name} ({p.get('setting', '')}): {f(p.get('per_s'))}/s, "
                         f"{f(p.get('cpu_us_per_event'))} us CPU/task {p.get('error', '')}")
        lines.append(f"  tokiwa vs fastest peer: {f(peers.get('tokiwa_vs_fastest_peer'), 2)}x (target >= 2); "
                     f"autopipe {f(peers.get('tokiwa_autopipe_vs_fastest_peer'), 2)}x, uvloop "
                     f"{f(peers.get('tokiwa_uvloop_vs_fastest_peer'), 2)}x, both "
                     f"{f(peers.get('tokiwa_autopipe_uvloop_vs_fastest_peer'), 2)}x")
    for key in ("latency", "latency_uvloop"):
        lat = result.get(key)
        if lat:
            lines.append(f"{key}: p50 {f(lat['p50_ms'], 2)} ms, p99 {f(lat['p99_ms'], 2)} ms, max "
                         f"{f(lat['max_ms'], 2)} ms (target p99 < 1.5)")
    chat = result.get("chatflow")
    if chat:
        lines.append(f"chatflow: {f(chat['chat']['per_s'])}/s vs plain {f(chat['plain']['per_s'])}/s = "
                     f"{f(chat['chat_vs_plain'], 3)} (target >= 0.25)")
    relay = result.get("relay")
    if relay:
        lines.append(f"relay: {relay['received']}/{relay['messages']} at {relay['rate_msgs_per_s']}/s, p50 "
                     f"{f(relay['p50_ms'], 2)} ms, p99 {f(relay['p99_ms'], 2)} ms (target < 5)")
    if "idle_rss_mb" in result:
        lines.append(f"idle worker RSS: {f(result['idle_rss_mb'], 1)} MB (target <= 40); uvloop "
                     f"{f(result.get('idle_rss_mb_uvloop'), 1)} MB")
    return "\n".join(lines)


def _git_head() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=RESULTS.parent, capture_output=True, text=True,
                              timeout=10)
    except OSError:
        return None
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the perf suite (see benchmarks/perf_bench.py)")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="5,000 events, 1 round")
    parser.add_argument("--profile", metavar="LABEL", help="py-spy the worker: results/profiles/LABEL-*.txt")
    parser.add_argument("--only", default="", help=f"comma-separated: {','.join(ROWS)}")
    args = parser.parse_args(argv)
    n, rounds = (5_000, 1) if args.quick else (args.events, args.rounds)
    if n < 1 or rounds < 1:
        parser.error("--events and --rounds must be >= 1")
    from orchestrator.broker.embedded import EmbeddedRedis

    started = time.time()
    commit = os.environ.get("BENCH_COMMIT") or _git_head()
    with tempfile.TemporaryDirectory() as state, EmbeddedRedis(state) as server:
        result = run(server.url, n=n, rounds=rounds, profile=args.profile,
                     only=tuple(x for x in args.only.split(",") if x))
    result["seconds"] = time.time() - started
    result["commit"] = commit
    result["machine"] = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                         "platform": platform.platform()}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"perf-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"written to {path} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
