"""Webhooks: POST a JSON body when a workflow run completes, fails, times out or is cancelled
(also when the worker running it stops: the run is settled ``cancelled``).

Configured by ``TOKIWA_WEBHOOK_*`` variables (read by :func:`load_webhook_settings`):

* ``TOKIWA_WEBHOOK_URL`` - where to POST (unset or empty = webhooks off);
* ``TOKIWA_WEBHOOK_EVENTS`` - comma list of ``run.completed``, ``run.failed``,
  ``run.timed_out``, ``run.cancelled`` (default: all four; ``run.failed`` includes
  ``run.timed_out``: a timeout is a failure);
* ``TOKIWA_WEBHOOK_TIMEOUT_S`` - seconds per attempt (default 3, pyoco's);
* ``TOKIWA_WEBHOOK_RETRIES`` - attempts **after** the first one (default 3);
* ``TOKIWA_WEBHOOK_SECRET`` - when set, header ``X-Tokiwa-Signature: sha256=<hex>`` carries
  the HMAC-SHA256, under this secret, of ``<timestamp>.`` followed by the exact body bytes,
  where ``<timestamp>`` is the header ``X-Tokiwa-Timestamp`` (Unix seconds, set at each
  attempt). A receiver checks both and refuses a timestamp older than its replay window
  (:func:`verify`: 5 minutes by default) and a ``X-Tokiwa-Delivery`` it has seen already.

:class:`WebhookNotifier` is a :class:`~orchestrator.workflow.hooks.WorkflowHooks`: its
``on_run_complete`` builds the body and hands the delivery to a background task that the
notifier owns, so a slow or hanging receiver never delays a run. A delivery is retried on
a network error, a timeout or a 5xx / 429 answer, with exponential backoff; other 4xx answers
are final (the receiver said no). Deliveries are at least once: a redelivered event reruns
its workflow and sends again, so receivers dedupe by ``run_id`` + ``event``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.errors import ConfigError, InvalidArgumentError
from orchestrator.workflow.hooks import WorkflowHooks

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("tokiwa.webhooks")

ENV_PREFIX = "TOKIWA_WEBHOOK_"
EVENT_BY_STATUS = {"succeeded": "run.completed", "failed": "run.failed", "timed_out": "run.timed_out",
                   "cancelled": "run.cancelled"}
WEBHOOK_EVENTS = tuple(EVENT_BY_STATUS.values())
#: an event also sent to receivers that asked for another one (a timeout is a failure)
IMPLIED_BY = {"run.timed_out": "run.failed"}
SIGNATURE_HEADER = "X-Tokiwa-Signature"
TIMESTAMP_HEADER = "X-Tokiwa-Timestamp"
# deliveries waiting or in flight at once; beyond it new ones are dropped (and logged) so that
# a dead receiver cannot make a busy worker's memory grow without bound.
MAX_PENDING = 1000


class WebhookSettings(BaseModel):
    """Webhook settings; units in the names, fails loudly on a bad value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    events: frozenset[str] = frozenset(WEBHOOK_EVENTS)
    timeout_s: float = Field(default=3.0, gt=0, le=300)
    retries: int = Field(default=3, ge=0, le=20)
    # pause before retry n is min(backoff_s * 2**(n-1), backoff_max_s)
    backoff_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    secret: str | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("events", mode="before")
    @classmethod
    def _event_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not value:
            return frozenset(WEBHOOK_EVENTS)
        unknown = sorted(set(value) - set(WEBHOOK_EVENTS))
        if unknown:
            raise ValueError(f"unknown webhook events {unknown}; known: {', '.join(WEBHOOK_EVENTS)}")
        return frozenset(value)

    @field_validator("secret")
    @classmethod
    def _no_blank_secret(cls, value: str | None) -> str | None:
        return value or None

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def wants(self, event: str) -> bool:
        """Whether ``event`` is sent: listed, or implied by a listed one (``run.failed`` gets
        ``run.timed_out``)."""
        return event in self.events or IMPLIED_BY.get(event, "") in self.events


def load_webhook_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> WebhookSettings:
    """Settings from ``TOKIWA_WEBHOOK_*`` variables (``env`` defaults to ``os.environ``),
    then ``overrides``. Raises ConfigError naming the variable of a bad value."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name in WebhookSettings.model_fields:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return WebhookSettings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else None
        var = ENV_PREFIX + field.upper() if field else "TOKIWA_WEBHOOK_*"
        raise ConfigError(f"invalid webhook setting {var}: {first.get('msg')}", field=field) from exc


#: seconds a receiver accepts a delivery after its ``X-Tokiwa-Timestamp`` (:func:`verify`)
REPLAY_WINDOW_S = 300


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Tokiwa-Signature`` value of ``body`` sent at ``timestamp`` (Unix seconds):
    ``sha256=<hex HMAC-SHA256 of "<timestamp>." + body>``."""
    return "sha256=" + hmac.new(secret.encode(), f"{int(timestamp)}.".encode() + body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str, timestamp: str | int, *,
           window_s: float = REPLAY_WINDOW_S, now: float | None = None) -> bool:
    """A receiver's check (in Python): the signature matches the body and the timestamp (in
    constant time), and the timestamp is within ``window_s`` of ``now`` (a replayed old
    delivery is refused)."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > window_s:
        return False
    return hmac.compare_digest(sign(secret, body, ts), signature or "")


def build_body(result: Any) -> dict[str, Any] | None:
    """The JSON body for a settled run (a :class:`~orchestrator.workflow.result.WorkflowRunResult`),
    or None when its status is not terminal. Field names follow pyoco's webhook body, with
    tokiwa's ``workflow`` / ``nodes`` instead of ``flow_name`` / ``tasks``; a failed node's
    ``traceback`` is its bounded traceback text (None for the others)."""
    event = EVENT_BY_STATUS.get(result.status)
    if event is None:
        return None
    nodes = {
        name: {"node_id": n.node_id, "status": n.status, "attempts": n.attempts, "duration_ms": n.duration_ms,
               "started_at": n.started_at, "ended_at": n.finished_at, "error": n.error,
               "traceback": getattr(n, "traceback", None)}
        for name, n in result.nodes.items()
    }
    return {
        "event": event, "run_id": result.run_id, "workflow": result.workflow_name,
        "workflow_id": result.workflow_id, "status": result.status, "started_at": result.started_at,
        "ended_at": result.finished_at, "duration_ms": result.duration_ms, "nodes": nodes,
        "error": result.error, "conversation_id": result.conversation_id,
    }


class WebhookNotifier(WorkflowHooks):
    """Sends run webhooks in background tasks it owns; give it to the Runner as hooks.

    ``sleep`` (async) is injectable so tests need not wait for backoff pauses. Start/stop
    it with the app: ``stop(grace_s)`` lets deliveries in flight finish for ``grace_s``
    seconds, then cancels the rest and closes the HTTP session. Idempotent."""

    def __init__(self, settings: WebhookSettings | None = None, *,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 max_pending: int = MAX_PENDING) -> None:
        if max_pending < 1:
            raise InvalidArgumentError(f"max_pending must be >= 1, got {max_pending!r}")
        self.settings = settings if settings is not None else load_webhook_settings()
        self._sleep = sleep
        self.max_pending = max_pending
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None  # created on the first delivery
        self.stats = {"sent": 0, "failed": 0, "dropped": 0, "attempts": 0}

    @property
    def pending(self) -> int:
        """Deliveries waiting or in flight."""
        return len(self._tasks)

    # -- hook -------------------------------------------------------------------------------
    def on_run_complete(self, result: Any) -> None:
        if not self.settings.enabled:
            return
        body = build_body(result)
        if body is None or not self.settings.wants(body["event"]):
            return
        self.submit(body)

    def submit(self, body: dict[str, Any]) -> asyncio.Task[Any] | None:
        """Queue one delivery of ``body``; returns its task (None if dropped: too many pending)."""
        if len(self._tasks) >= self.max_pending:
            self.stats["dropped"] += 1
            log.error("webhook %s for run %s dropped: %d deliveries already pending",
                      body.get("event"), body.get("run_id"), len(self._tasks))
            return None
        task = asyncio.get_running_loop().create_task(self._deliver(body), name="tokiwa-webhook")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- delivery ---------------------------------------------------------------------------
    def _backoff_s(self, retry: int) -> float:
        s = self.settings
        delay: float = s.backoff_s * 2 ** (retry - 1)
        return min(delay, s.backoff_max_s)

    async def _deliver(self, body: dict[str, Any]) -> bool:
        try:
            return await self._attempts(body)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug or an odd URL must not become an unretrieved task error
            self.stats["failed"] += 1
            log.exception("webhook %s for run %s failed unexpectedly", body.get("event"), body.get("run_id"))
            return False

    async def _attempts(self, body: dict[str, Any]) -> bool:
        data = json.dumps(body, ensure_ascii=False, default=repr).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "tokiwa-webhook",
                   "X-Tokiwa-Event": body["event"], "X-Tokiwa-Delivery": uuid.uuid4().hex}
        attempts = self.settings.retries + 1
        for attempt in range(1, attempts + 1):
            if self.settings.secret:  # signed at each attempt: a retry is not a replay
                stamp = int(time.time())
                headers[TIMESTAMP_HEADER] = str(stamp)
                headers[SIGNATURE_HEADER] = sign(self.settings.secret, data, stamp)
            self.stats["attempts"] += 1
            problem = await self._post(data, headers)
            if problem is None:
                self.stats["sent"] += 1
                return True
            final = problem.startswith("HTTP 4") and not problem.startswith("HTTP 429")
            if final or attempt == attempts:
                break
            log.info("webhook %s for run %s: attempt %d failed (%s); retrying",
                     body["event"], body["run_id"], attempt, problem)
            await self._sleep(self._backoff_s(attempt))
        self.stats["failed"] += 1
        log.warning("webhook %s for run %s not delivered after %d attempt(s): %s",
                    body["event"], body["run_id"], attempt, problem)
        return False

    async def _post(self, data: bytes, headers: dict[str, str]) -> str | None:
        """One attempt; None on a 2xx answer, else a short description of the problem."""
        import aiohttp  # imported on the first delivery: a worker without webhooks never pays for it

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        started = time.monotonic()
        try:
            url = cast(str, self.settings.url)  # only enabled settings (a url) deliver
            async with self._session.post(url, data=data, headers=headers,
                                          timeout=timeout) as response:
                await response.read()
                return None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except TimeoutError:
            return f"timeout after {time.monotonic() - started:.1f}s"
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}"

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Nothing to start (the HTTP session is created on the first delivery)."""

    async def wait(self, timeout: float | None = None) -> None:
        """Wait until every delivery queued so far has finished (or ``timeout`` passed)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Let deliveries finish for ``grace_s`` seconds, cancel the rest, close the session."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        leftover = list(self._tasks)
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.gather(*leftover, return_exceptions=True)
            log.warning("webhook notifier stopped: %d undelivered webhook(s) cancelled", len(leftover))
        if self._session is not None:
            await self._session.close()
            self._session = None
