"""The HTTP API of a worker or producer: runs, logs, workers, health, readiness, metrics.

Built on aiohttp: it is already a dependency (webhooks use its client), it is asyncio-native
(the server runs on the app's own event loop, no thread, no second framework), and it is
small and long maintained. FastAPI (pyoco's choice) would add pydantic routing, starlette
and uvicorn for seven GET routes and one POST.

Routes (JSON unless said otherwise):

* ``GET /runs?status=&workflow=&limit=`` - run summaries newest first, each with a
  ``task_summary``; ``limit`` 1-200 (default 50); a bad value is a 400;
* ``GET /runs/{id}`` - the whole run record plus ``task_summary`` (404 if unknown);
* ``GET /runs/{id}/logs?tail=N`` - ``{run_id, run_status, logs}`` (404 if unknown);
* ``POST /runs/{id}/cancel`` (optional JSON body ``{"by": ..., "reason": ...}``) - cancel the
  run wherever it runs; the answer of ``Orchestrator.cancel_run``: ``{run_id, cancelled,
  status, by, at}``, or ``{run_id, cancelled: false, status, reason}`` if it had finished;
* ``GET /workers`` - worker heartbeats with age and a stale flag;
* ``GET /healthz`` - 200 while the process serves requests (never needs the token);
* ``GET /readyz`` - 200 if Redis answers and the app's consumer groups exist, else 503
  (never needs the token either: Kubernetes probes it);
* ``GET /metrics`` - Prometheus text (every process of the host in multiprocess mode);
* ``/dashboard/`` - the web dashboard and the JSON it polls (:mod:`orchestrator.ops.dashboard`).

It binds to 127.0.0.1 unless given another host. With a ``token``, every route but
``/healthz``, ``/readyz`` and the dashboard's reads needs ``Authorization: Bearer <token>`` (401
otherwise); the dashboard's requeue and purge need it too, and are refused without a token.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, overload

from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from orchestrator.errors import InvalidArgumentError, StateError
from orchestrator.ops import metrics
from orchestrator.ops.dashboard import MOUNT, Dashboard, DashboardData, bearer_ok, json_errors
from orchestrator.ops.inspector import Inspector
from orchestrator.runs.stores import check_run_id

log = logging.getLogger("tokiwa.http")

DEFAULT_PORT = 8000  # pyoco's server port
MAX_LIMIT = 200
READY_TIMEOUT_S = 2.0  # /readyz answers 503 rather than hang on a dead Redis
#: the probes a kubelet calls without a token (they tell only "up" / "ready" and why not)
PROBES = frozenset({"/healthz", "/readyz"})
REFRESH_TIMEOUT_S = 1.0  # a scrape serves stale Redis gauges rather than wait longer
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=repr, ensure_ascii=False), status=status,
                        content_type="application/json")


@overload
def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int | None) -> int: ...
@overload
def _int_param(request: web.Request, name: str, default: None, lo: int, hi: int | None) -> int | None: ...
def _int_param(request: web.Request, name: str, default: int | None, lo: int, hi: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < lo or (hi is not None and value > hi):
        bounds = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise InvalidArgumentError(f"{name} must be an integer {bounds}, got {raw!r}")
    return value


class ApiServer:
    """Serves the HTTP API for ``app`` (an :class:`~orchestrator.Orchestrator`).

    A lifecycle component: ``await start()`` binds (``port=0`` picks a free port, read it
    back from :attr:`port`), ``await stop()`` closes it; both idempotent. Requests use the
    app's Redis connection, so start the app (or ``await app.connect()``) first."""

    routes: tuple[str, ...] = ("runs", "workers", "healthz", "readyz", "metrics", "dashboard")

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
                 *, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise InvalidArgumentError(f"port must be an integer from 0 to 65535, got {port!r}")
        if token is not None and not token.strip():
            raise InvalidArgumentError("token must not be blank (use None for no token)")
        self.app = app
        self.host = host
        self.port = port
        self.token = token
        self.ready_timeout_s = ready_timeout_s
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- lifecycle --------------------------------------------------------------------------
    def build(self) -> web.Application:
        """The aiohttp application (routes and middlewares), also usable with aiohttp's test tools."""
        webapp = web.Application(middlewares=[self._errors, self._auth])
        table: dict[str, list[tuple[str, str, Handler]]] = {
            "runs": [("GET", "/runs", self.list_runs), ("GET", "/runs/{run_id}", self.get_run),
                     ("GET", "/runs/{run_id}/logs", self.get_logs),
                     ("POST", "/runs/{run_id}/cancel", self.cancel_run)],
            "workers": [("GET", "/workers", self.list_workers)],
            "healthz": [("GET", "/healthz", self.healthz)],
            "readyz": [("GET", "/readyz", self.readyz)],
            "metrics": [("GET", "/metrics", self.metrics)],
        }
        for name in self.routes:
            for method, path, handler in table.get(name, []):
                webapp.router.add_route(method, path, handler)
        if "dashboard" in self.routes:
            Dashboard(DashboardData(self._inspector, self.app), self.token).mount(webapp, MOUNT)
        return webapp

    async def start(self) -> None:
        if self._runner is not None:
            return
        if self.token is None and self.host not in LOOPBACK:
            log.warning("HTTP API on %s without a token: anyone who can reach the port can read and cancel runs",
                        self.host)
        runner = web.AppRunner(self.build(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("%s listening on %s", type(self).__name__, self.url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- middlewares ------------------------------------------------------------------------
    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.token is not None and request.path not in PROBES and not self._dashboard_read(request):
            if not bearer_ok(request, self.token):
                response = _json({"error": "unauthorized: send Authorization: Bearer <token>"}, 401)
                response.headers["WWW-Authenticate"] = 'Bearer realm="tokiwa"'
                return response
        return await handler(request)

    def _dashboard_read(self, request: web.Request) -> bool:
        """A GET of the dashboard (its page and JSON): open without the token, read-only."""
        path = request.path
        return ("dashboard" in self.routes and request.method in ("GET", "HEAD")
                and (path == MOUNT or path.startswith(MOUNT + "/")))

    _errors = staticmethod(json_errors("HTTP"))

    # -- handlers ---------------------------------------------------------------------------
    def _inspector(self) -> Inspector:
        if self.app.redis is None:
            raise StateError("the app is not connected to Redis")
        return Inspector.from_app(self.app)

    async def list_runs(self, request: web.Request) -> web.Response:
        limit = _int_param(request, "limit", 50, 1, MAX_LIMIT)
        status = request.query.get("status") or None
        workflow = request.query.get("workflow") or None
        return _json(await self._inspector().runs(status=status, workflow=workflow, limit=limit))

    async def get_run(self, request: web.Request) -> web.Response:
        run_id = check_run_id(request.match_info["run_id"])
        record = await self._inspector().run(run_id, tail=0)
        record.pop("logs", None)
        return _json(record)

    async def get_logs(self, request: web.Request) -> web.Response:
        run_id = check_run_id(request.match_info["run_id"])
        tail = _int_param(request, "tail", None, 0, None)
        run = await self._inspector().run(run_id, tail=tail)
        return _json({"run_id": run_id, "run_status": run.get("status"), "logs": run["logs"]})

    async def cancel_run(self, request: web.Request) -> web.Response:
        run_id = check_run_id(request.match_info["run_id"])
        body: Any = None
        if request.can_read_body:
            text = await request.text()
            try:
                body = json.loads(text) if text.strip() else None
            except ValueError as exc:
                raise InvalidArgumentError(f"the body must be JSON: {exc}") from None
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise InvalidArgumentError('the body must be a JSON object: {"by": ..., "reason": ...}')
        by, reason = body.get("by"), body.get("reason")
        for name, value in (("by", by), ("reason", reason)):
            if value is not None and not isinstance(value, str):
                raise InvalidArgumentError(f"{name} must be a string, got {type(value).__name__}")
        if self.app.redis is None:
            raise StateError("the app is not connected to Redis")
        return _json(await self.app.cancel_run(run_id, by=by or None, reason=reason or None))

    async def list_workers(self, request: web.Request) -> web.Response:
        return _json(await self._inspector().workers())

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        problem = await self._readiness_problem()
        if problem is None:
            return _json({"status": "ready"})
        return _json({"status": "not ready", "reason": problem}, 503)

    async def _readiness_problem(self) -> str | None:
        redis = self.app.redis
        if redis is None:
            return "not connected to Redis"
        keys = self.app.keys
        wanted = self.app.route_groups() if hasattr(self.app, "route_groups") else [self.app.settings.group]
        try:
            async with asyncio.timeout(self.ready_timeout_s):
                await redis.ping()
                if not wanted:  # an app with no routes (a producer) needs only Redis
                    return None
                missing: list[str] = []
                for part in keys.partitions(self.app.settings.partitions):
                    groups = await redis.xinfo_groups(part.events)
                    names = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"] for g in groups}
                    missing += [f"{g} ({part.events})" for g in wanted if g not in names]
        except TimeoutError:
            return f"Redis did not answer within {self.ready_timeout_s}s"
        except RedisError as exc:
            if "no such key" in str(exc).lower():
                return f"stream {keys.events} does not exist"
            return f"Redis unavailable: {type(exc).__name__}: {exc}"
        return None if not missing else f"consumer groups do not exist: {', '.join(missing)}"

    async def metrics(self, request: web.Request) -> web.Response:
        broker = getattr(self.app, "broker", None)
        if broker is not None:
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT_S):
                    await metrics.refresh_gauges(broker)
            except (TimeoutError, RedisError, OSError) as exc:
                log.debug("metrics: stream gauges not refreshed: %s", exc)
        body, content_type = metrics.scrape()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response


class MetricsServer(ApiServer):
    """Only ``/metrics`` and ``/healthz`` (for ``--metrics-port``, or the supervisor of
    ``--processes`` serving the whole host's metrics)."""

    routes = ("healthz", "metrics")

    def __init__(self, app: Any = None, host: str = "127.0.0.1", port: int = 9464, token: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(app, host, port, token, **kwargs)
