"""Artifact stores: one specification for the file and in-memory stores."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from orchestrator.errors import InvalidArgumentError, NotFoundError
from orchestrator.workflow.artifacts import ArtifactStore, FileArtifactStore, InMemoryArtifactStore


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "file":
        return FileArtifactStore(tmp_path / "artifacts")
    return InMemoryArtifactStore()


def test_stored_bytes_load_back_unchanged(store):
    store.store("out/report.bin", b"\x00\x01binary")
    assert store.load("out/report.bin") == b"\x00\x01binary"


def test_text_is_stored_as_utf8(store):
    store.store("note.txt", "héllo")
    assert store.load("note.txt") == "héllo".encode()
    assert store.load_text("note.txt") == "héllo"


def test_store_returns_the_uri_and_records_size_and_sha256_in_the_manifest(store):
    uri = store.store("a.txt", b"abc")
    entry = store.manifest()[-1]
    assert entry["uri"] == uri
    assert entry["name"] == "a.txt" and entry["size"] == 3
    assert entry["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert entry["uri"].endswith("a.txt")


def test_manifest_lists_what_was_stored_once_per_name(store):
    store.store("a", b"1")
    store.store("b", b"2")
    store.store("a", b"3")
    assert [e["name"] for e in store.manifest()] == ["b", "a"]
    assert store.load("a") == b"3"


def test_deleted_artifacts_leave_the_store_and_the_manifest(store):
    store.store("a", b"1")
    assert store.delete("a") is True
    assert store.delete("a") is False
    assert not store.exists("a") and store.manifest() == []


def test_loading_a_missing_artifact_names_it(store):
    with pytest.raises(NotFoundError, match="'missing.txt'"):
        store.load("missing.txt")


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/../b", "", ".hidden", "a//b", "sp ace"])
def test_names_that_could_escape_the_store_are_refused(store, name):
    with pytest.raises(InvalidArgumentError, match="artifact name"):
        store.store(name, b"x")


def test_non_bytes_data_is_a_clear_error(store):
    with pytest.raises(InvalidArgumentError, match="bytes or str"):
        store.store("a", 42)


def test_scopes_isolate_runs_from_each_other(store):
    run1, run2 = store.scoped("run-1"), store.scoped("run-2")
    run1.store("x", b"one")
    run2.store("x", b"two")
    assert run1.load("x") == b"one" and run2.load("x") == b"two"
    assert [e["name"] for e in run1.manifest()] == ["x"]
    assert store.load("run-1/x") == b"one"


def test_file_store_writes_files_under_its_path(tmp_path):
    store = FileArtifactStore(tmp_path / "a").scoped("run-9")
    uri = store.store("dir/file.txt", b"data")
    path = tmp_path / "a" / "run-9" / "dir" / "file.txt"
    assert path.read_bytes() == b"data"
    assert uri == path.resolve().as_uri()


def test_threads_can_store_concurrently(store):
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.store(f"f{i}", str(i)), range(40)))
    assert len(store.manifest()) == 40 and store.load_text("f39") == "39"


def test_list_names_every_artifact_in_the_scope_including_other_writers(store):
    store.scoped("run-1").store("b/c.txt", b"1")
    store.scoped("run-1").store("a", b"2")
    store.scoped("run-2").store("z", b"3")
    assert store.scoped("run-1").list() == ["a", "b/c.txt"]
