"""Bulk publishing from a JSON-lines file, in pipelined batches, with a progress bar."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from orchestrator.errors import InvalidArgumentError
from orchestrator.events import Event


def read_events(path: Path) -> Iterator[Event]:
    """Yield events from a JSON-lines file of ``{type, payload, metadata, key}`` (``key``
    optional: the ordering key); a bad line is an error naming its number."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "type" not in record:
                    raise ValueError("each line must be an object with a 'type'")
                metadata = record.get("metadata")
                if record.get("key") is not None:  # the ordering key, as publish(key=...) takes it
                    if not isinstance(record["key"], str) or not record["key"].strip():
                        raise ValueError(f"'key' must be a non-blank string, got {record['key']!r}")
                    metadata = {**(metadata if isinstance(metadata, dict) else {}), "key": record["key"]}
                yield Event(record["type"], record.get("payload"), metadata)
            except (ValueError, InvalidArgumentError) as exc:
                raise InvalidArgumentError(f"{path}:{number}: {exc}") from exc


class Publisher(Protocol):
    """What :func:`publish_file` uses of the app."""

    async def publish_many(self, events: Iterable[Event]) -> list[str]: ...


async def publish_file(app: Publisher, path: Path, *, batch: int = 500, progress: bool | None = None) -> int:
    """Publish every event of ``path``; returns how many were published."""
    show = sys.stderr.isatty() if progress is None else progress
    total = 0
    buffer: list[Event] = []
    with tqdm(unit="ev", disable=not show, file=sys.stderr) as bar:
        for event in read_events(path):
            buffer.append(event)
            if len(buffer) >= batch:
                total += len(await app.publish_many(buffer))
                bar.update(len(buffer))
                buffer = []
        if buffer:
            total += len(await app.publish_many(buffer))
            bar.update(len(buffer))
    return total
