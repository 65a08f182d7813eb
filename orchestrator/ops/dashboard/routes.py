"""The dashboard's aiohttp application: the page, its static files and the JSON it polls.

Mounted at ``/dashboard`` on the worker's HTTP API (:class:`~orchestrator.ops.http_api.ApiServer`)
or served alone by ``tokiwa-producer dashboard``. Paths below are relative to the mount point:

* ``GET /`` - the page (``static/index.html``); ``GET /static/...`` - its script and style;
* ``GET /api/session`` - ``{read_only, authorized}``: whether requeue / purge are possible
  (a token is configured) and whether this request's token is right;
* ``GET /api/summary`` - counts for the navigation bar;
* ``GET /api/runs?status=&workflow=&limit=`` - ``{runs, workflows}``;
* ``GET /api/runs/{run_id}`` - the run record, its last log lines and its DAG (``graph``);
* ``GET /api/workers``, ``/api/streams``, ``/api/dead?limit=``, ``/api/dead/{dead_id}``,
  ``/api/cron``, ``/api/locks``, ``/api/relays``, ``/api/delayed?limit=``;
* ``POST /api/dead/requeue`` (``{"ids": [...]}`` or ``{"all": true}``) and
  ``POST /api/dead/purge`` - need ``Authorization: Bearer <token>``.

Reads need no token; the two mutating routes need the bearer token, and with no token
configured they are refused (403): the dashboard is then read-only. A browser sends the
``Authorization`` header only from the page's own script (no CORS headers are served), so
another site cannot make a visitor's browser requeue or purge.
"""

from __future__ import annotations

import hmac
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from orchestrator.errors import InvalidArgumentError, NotFoundError, StateError
from orchestrator.ops.dashboard.data import DashboardData
from orchestrator.runs.stores import check_run_id
from orchestrator.workflow.result import RUN_STATUSES

log = logging.getLogger("tokiwa.dashboard")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MOUNT = "/dashboard"
MAX_LIMIT = 200


def bearer_ok(request: web.Request, token: str) -> bool:
    """True when ``request`` carries ``Authorization: Bearer <token>`` (constant-time compare)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def json_errors(what: str) -> Any:
    """An aiohttp middleware that answers the errors of a JSON route as JSON: 400 for a bad
    argument, 404 for something missing, 503 when Redis is unavailable (logged with ``what``:
    the dashboard's and the HTTP API's routes share it)."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except InvalidArgumentError as exc:
            return _json({"error": str(exc)}, 400)
        except NotFoundError as exc:
            return _json({"error": str(exc)}, 404)
        except (RedisError, OSError, StateError) as exc:
            log.warning("%s %s %s: Redis unavailable: %s", what, request.method, request.path, exc)
            return _json({"error": f"Redis unavailable: {exc}"}, 503)
    return middleware


def _json(data: Any, status: int = 200) -> web.Response:
    response = web.Response(text=json.dumps(data, default=repr, ensure_ascii=False), status=status,
                            content_type="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def _limit(request: web.Request, default: int) -> int:
    raw = request.query.get("limit") or ""
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidArgumentError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw!r}")
    return int(raw)


class Dashboard:
    """The dashboard over ``data`` (a :class:`DashboardData`); ``token`` enables requeue and
    purge for requests that carry it. :meth:`application` is the aiohttp app to mount."""

    def __init__(self, data: DashboardData, token: str | None = None) -> None:
        if token is not None and not token.strip():
            raise InvalidArgumentError("token must not be blank (use None for no token)")
        self.data = data
        self.token = token

    def application(self) -> web.Application:
        webapp = web.Application(middlewares=[self._errors])
        r = webapp.router
        r.add_get("/", self.index)
        r.add_static("/static", STATIC_DIR, append_version=False)
        r.add_get("/api/session", self.session)
        r.add_get("/api/summary", self.summary)
        r.add_get("/api/runs", self.runs)
        r.add_get("/api/runs/{run_id}", self.run)
        r.add_get("/api/workers", self.workers)
        r.add_get("/api/streams", self.streams)
        r.add_get("/api/dead", self.dead)
        r.add_get("/api/dead/{dead_id}", self.dead_one)
        r.add_post("/api/dead/requeue", self.requeue)
        r.add_post("/api/dead/purge", self.purge)
        r.add_get("/api/cron", self.cron)
        r.add_get("/api/locks", self.locks)
        r.add_get("/api/relays", self.relays)
        r.add_get("/api/delayed", self.delayed)
        return webapp

    def mount(self, parent: web.Application, prefix: str = MOUNT) -> None:
        """Serve the dashboard under ``prefix`` of ``parent`` (``prefix`` alone redirects to
        ``prefix/``, so the page's relative links resolve)."""

        async def slash(request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound(prefix + "/")

        parent.router.add_get(prefix, slash)
        parent.add_subapp(prefix + "/", self.application())

    # -- middleware and token ---------------------------------------------------------------
    _errors = staticmethod(json_errors("dashboard"))

    def _refusal(self, request: web.Request) -> web.Response | None:
        """None when ``request`` may change state, else the 403 / 401 answer."""
        if self.token is None:
            return _json({"error": "read-only: this dashboard has no token (start it with --api-token "
                                   "to requeue and purge)"}, 403)
        if not bearer_ok(request, self.token):
            response = _json({"error": "unauthorized: send Authorization: Bearer <token>"}, 401)
            response.headers["WWW-Authenticate"] = 'Bearer realm="tokiwa"'
            return response
        return None

    async def _body(self, request: web.Request) -> dict[str, Any]:
        text = await request.text() if request.can_read_body else ""
        try:
            body = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise InvalidArgumentError(f"the body must be JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidArgumentError("the body must be a JSON object")
        return body

    # -- handlers ---------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        response = web.FileResponse(STATIC_DIR / "index.html")
        response.headers["Cache-Control"] = "no-store"
        return response

    async def session(self, request: web.Request) -> web.Response:
        authorized = self.token is not None and bearer_ok(request, self.token)
        return _json({"read_only": self.token is None, "authorized": authorized})

    async def summary(self, request: web.Request) -> web.Response:
        return _json(await self.data.summary())

    async def runs(self, request: web.Request) -> web.Response:
        status = request.query.get("status") or None
        if status is not None and status not in RUN_STATUSES:
            raise InvalidArgumentError(f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        workflow = request.query.get("workflow") or None
        return _json(await self.data.runs(status=status, workflow=workflow, limit=_limit(request, 50)))

    async def run(self, request: web.Request) -> web.Response:
        return _json(await self.data.run(check_run_id(request.match_info["run_id"])))

    async def workers(self, request: web.Request) -> web.Response:
        return _json(await self.data.workers())

    async def streams(self, request: web.Request) -> web.Response:
        return _json(await self.data.streams())

    async def dead(self, request: web.Request) -> web.Response:
        return _json(await self.data.inspector.dead_list(limit=_limit(request, 100)))

    async def dead_one(self, request: web.Request) -> web.Response:
        return _json(await self.data.inspector.dead_show(request.match_info["dead_id"]))

    async def requeue(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        body = await self._body(request)
        ids, all_ = body.get("ids"), body.get("all") is True
        if all_ == (ids is not None):
            raise InvalidArgumentError('give {"ids": [dead id, ...]} or {"all": true}')
        if not all_ and (not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids)):
            raise InvalidArgumentError('"ids" must be a non-empty list of dead letter ids')
        inspector = self.data.inspector
        rows = await (inspector.requeue_all() if all_ else inspector.requeue(ids or []))
        log.info("dashboard: requeued %d dead letter(s)", sum(1 for r in rows if r["stream_id"]))
        return _json({"requeued": rows, "count": sum(1 for r in rows if r["stream_id"])})

    async def purge(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        purged = await self.data.inspector.purge()
        log.info("dashboard: purged %d dead letter(s)", purged)
        return _json({"purged": purged})

    async def cron(self, request: web.Request) -> web.Response:
        return _json(await self.data.cron())

    async def locks(self, request: web.Request) -> web.Response:
        return _json(await self.data.locks())

    async def relays(self, request: web.Request) -> web.Response:
        return _json(await self.data.relays())

    async def delayed(self, request: web.Request) -> web.Response:
        return _json(await self.data.delayed(limit=_limit(request, 100)))
