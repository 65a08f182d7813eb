"""Artifact stores: named blobs a node keeps for later nodes, users and the run record.

A node calls ``ctx.artifacts.store("report.csv", data)`` and ``ctx.artifacts.load(name)``.
Give each run its own scope (``store.scoped(run_id)``) so two runs never see each other's
files. The node context records every stored artifact in the run record (name, node, size,
location = the uri ``store`` returns); ``scope.manifest()`` adds sha256 and stored_at. The
bytes themselves never go into a run record. A run without ``services.artifacts`` uses an
:class:`InMemoryArtifactStore`.

The methods are synchronous on purpose: sync handlers run in a thread pool and must be able
to call them, and artifacts are small local writes. Names are relative paths made of
letters, digits, ``.``, ``_`` and ``-`` segments separated by ``/`` (no ``..``, no leading
``/``), so a name can never escape the store's directory.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import InvalidArgumentError, NotFoundError

_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def check_name(name: Any) -> str:
    """Return ``name`` if it is a safe relative artifact name, else raise InvalidArgumentError."""
    if not isinstance(name, str) or not name or len(name) > 255:
        raise InvalidArgumentError(f"artifact name must be a non-empty string (max 255), got {name!r}")
    if not all(_SEGMENT.match(part) for part in name.split("/")):
        raise InvalidArgumentError(
            f"invalid artifact name {name!r}: use '/'-separated segments of letters, digits, "
            "'.', '_' or '-' (no '..', no leading '/' or '.')"
        )
    return name


def _as_bytes(name: str, data: Any) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise InvalidArgumentError(f"artifact {name!r}: data must be bytes or str, got {type(data).__name__}")


class ArtifactStore:
    """Base class. Subclasses implement ``_put``, ``_get``, ``_delete``, ``_uri``, ``scoped``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._manifest: dict[str, dict[str, Any]] = {}

    def store(self, name: str, data: bytes | str) -> str:
        """Store ``data`` (str is UTF-8 encoded) under ``name``, replacing any previous value.

        Returns the artifact's uri (``file:///…`` or ``memory://…``); its manifest entry
        (name, size, sha256, uri, stored_at) is in :meth:`manifest`.
        """
        payload = _as_bytes(check_name(name), data)
        self._put(name, payload)
        uri = self._uri(name)
        entry: dict[str, Any] = {
            "name": name,
            "size": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "uri": uri,
            "stored_at": time.time(),
        }
        with self._lock:
            self._manifest.pop(name, None)  # re-stored names move to the end
            self._manifest[name] = entry
        return uri

    def load(self, name: str) -> bytes:
        """The bytes stored under ``name``; NotFoundError if there are none."""
        data = self._get(check_name(name))
        if data is None:
            raise NotFoundError(f"no artifact named {name!r}")
        return data

    def load_text(self, name: str) -> str:
        return self.load(name).decode("utf-8")

    def exists(self, name: str) -> bool:
        return self._get(check_name(name)) is not None

    def delete(self, name: str) -> bool:
        """Delete ``name``; True if it existed."""
        existed = self._delete(check_name(name))
        with self._lock:
            self._manifest.pop(name, None)
        return existed

    def list(self) -> list[str]:
        """Names of every artifact in this store (or scope), sorted; includes ones stored by
        other store objects sharing the backend."""
        return sorted(self._names())

    def manifest(self) -> builtins.list[dict[str, Any]]:
        """What this store object has stored (and not deleted), in storing order."""
        with self._lock:
            return [dict(entry) for entry in self._manifest.values()]

    def scoped(self, prefix: str) -> ArtifactStore:
        """A store for one run (or workflow): same backend, names under ``prefix/``."""
        raise NotImplementedError

    # --- backend hooks -------------------------------------------------------------------
    def _put(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def _get(self, name: str) -> bytes | None:
        raise NotImplementedError

    def _delete(self, name: str) -> bool:
        raise NotImplementedError

    def _uri(self, name: str) -> str:
        raise NotImplementedError

    def _names(self) -> builtins.list[str]:
        raise NotImplementedError


class InMemoryArtifactStore(ArtifactStore):
    """Artifacts in a dict shared by all its scopes; for tests and throwaway runs."""

    def __init__(self, *, _blobs: dict[str, bytes] | None = None, _prefix: str = "") -> None:
        super().__init__()
        self._blobs: dict[str, bytes] = {} if _blobs is None else _blobs
        self._prefix = _prefix

    def scoped(self, prefix: str) -> InMemoryArtifactStore:
        return InMemoryArtifactStore(_blobs=self._blobs, _prefix=self._prefix + check_name(prefix) + "/")

    def _put(self, name: str, data: bytes) -> None:
        self._blobs[self._prefix + name] = data

    def _get(self, name: str) -> bytes | None:
        return self._blobs.get(self._prefix + name)

    def _delete(self, name: str) -> bool:
        return self._blobs.pop(self._prefix + name, None) is not None

    def _uri(self, name: str) -> str:
        return f"memory://{self._prefix}{name}"

    def _names(self) -> list[str]:
        size = len(self._prefix)
        return [key[size:] for key in list(self._blobs) if key.startswith(self._prefix)]


class FileArtifactStore(ArtifactStore):
    """Artifacts as files under ``path`` (created on first write).

    Writes are atomic (temp file + rename), so a reader never sees half an artifact.
    The ``uri`` of an entry is its absolute ``file://`` path.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path).resolve()

    def scoped(self, prefix: str) -> FileArtifactStore:
        return FileArtifactStore(self.path / check_name(prefix))

    def _file(self, name: str) -> Path:
        return self.path / name

    def _put(self, name: str, data: bytes) -> None:
        target = self._file(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def _get(self, name: str) -> bytes | None:
        try:
            return self._file(name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def _delete(self, name: str) -> bool:
        try:
            self._file(name).unlink()
        except FileNotFoundError:
            return False
        return True

    def _uri(self, name: str) -> str:
        return self._file(name).as_uri()

    def _names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return [p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                if p.is_file() and not p.name.startswith(".")]
