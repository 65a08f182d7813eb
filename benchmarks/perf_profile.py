"""Flame summaries of py-spy's collapsed stacks (``py-spy record --format raw``), as text.

``python -m benchmarks.perf_profile STACKS.txt [--title T]`` prints one; the perf suite
(``--profile LABEL``) writes ``results/profiles/LABEL-<case>.txt`` with it. A summary lists
the functions by self time (samples where the function is the leaf) and by total time
(samples where it is anywhere on the stack, counted once per sample), then the hottest source
lines by self time, and the share of samples under a few markers (the handler, redis-py,
msgpack, the event loop), each as a percentage of the non-idle samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")

#: (label, substring of a frame's file or function) for the "where it goes" lines
MARKERS = [
    ("tokiwa consumer (orchestrator/broker/consumer.py)", "broker/consumer.py"),
    ("tokiwa streams (orchestrator/broker/streams.py)", "broker/streams.py"),
    ("dispatcher", "orchestrator/dispatcher.py"),
    ("runs / registry / recorder", "orchestrator/runs/"),
    ("chat (chatflow, conversations)", "orchestrator/chat/"),
    ("locks", "orchestrator/locks.py"),
    ("workflow engine", "orchestrator/workflow/"),
    ("event decode (events.py)", "orchestrator/events.py"),
    ("redis-py", "redis/"),
    ("msgpack", "msgpack"),
    ("asyncio", "asyncio/"),
    ("the benchmark handler (benchmarks/)", "benchmarks/"),
]


#: a frame on at least this share of the samples is a root (the CLI, the event loop) in the totals
ROOT_SHARE = 0.9


def _short(path: str) -> str:
    for cut in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if cut in path:
            path = path.split(cut, 1)[1]
    return path


def parse(text: str) -> list[tuple[list[tuple[str, str, str]], int]]:
    """``[(frames root -> leaf as (function, file, line)), count]`` from collapsed stacks."""
    out = []
    for raw in text.splitlines():
        stack, _, count = raw.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for part in stack.split(";"):
            m = _FRAME.match(part.strip())
            if m:
                frames.append((m["func"], _short(m["file"]), m["line"] or "?"))
            else:
                frames.append((part.strip(), "?", "?"))
        out.append((frames, int(count)))
    return out


def summarize(text: str, title: str = "", top: int = 30) -> str:
    stacks = parse(text)
    total = sum(c for _, c in stacks) or 1
    self_fn: Counter[str] = Counter()
    total_fn: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    markers: Counter[str] = Counter()
    for frames, count in stacks:
        leaf = frames[-1]
        self_fn[f"{leaf[0]} ({leaf[1]})"] += count
        self_line[f"{leaf[0]} ({leaf[1]}:{leaf[2]})"] += count
        for name in {f"{f} ({file})" for f, file, _ in frames}:
            total_fn[name] += count
        joined = ";".join(f"{f} {file}" for f, file, _ in frames)
        for label, needle in MARKERS:
            if needle in joined:
                markers[label] += count

    def table(counter: Counter[str], heading: str, skip_roots: bool = False) -> list[str]:
        rows = [f"## {heading}", f"{'%':>6}  {'samples':>8}  frame"]
        items = [(name, n) for name, n in counter.most_common()
                 if not (skip_roots and n >= ROOT_SHARE * total)][:top]
        rows += [f"{n / total * 100:6.1f}  {n:8d}  {name}" for name, n in items]
        return rows + [""]

    lines = [f"# {title}" if title else "# profile", f"non-idle samples: {total}", ""]
    lines += ["## share of samples with a frame of (a sample counts under every marker on its stack)"]
    lines += [f"{markers[label] / total * 100:6.1f}  {label}" for label, _ in MARKERS] + [""]
    lines += table(self_fn, "self time by function (leaf frame)")
    roots = sorted(name for name, n in total_fn.items() if n >= ROOT_SHARE * total)
    lines += table(total_fn, "total time by function (anywhere on the stack; the frames on nearly every "
                   f"stack are left out: {', '.join(r.split(' (')[0] for r in roots) or 'none'})", skip_roots=True)
    lines += table(self_line, "self time by source line")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stacks", type=Path)
    parser.add_argument("--title", default="")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(summarize(args.stacks.read_text(), args.title or args.stacks.name, args.top))


if __name__ == "__main__":
    main()
