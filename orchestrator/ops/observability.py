"""Turn on metrics, the HTTP API and webhooks for an app, only when they are configured.

``Orchestrator.start()`` calls :func:`enable`. With no ``metrics_port`` / ``api_port``, no
``PROMETHEUS_MULTIPROC_DIR`` and no ``TOKIWA_WEBHOOK_URL``, nothing is imported: an idle
worker does not pay for prometheus-client or aiohttp.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.workflow.runner import Runner

log = logging.getLogger("tokiwa.observability")


class ObservedHooks(Protocol):
    """The app's hooks that observability installs (``orchestrator.app.AppHooks`` has them)."""

    #: ``fn(event_type, outcome)``, outcome ok / failed / dead, for every consumed event
    event_observer: Callable[[str, str], None] | None
    #: ``fn(leading)`` when this process gains or loses cron leadership
    on_cron_leadership: Callable[[bool], Any] | None
    #: ``fn()`` when a chatflow turn arrives that its publisher could not order
    on_unordered: Callable[[], Any] | None
    #: ``fn()`` when an event waits for a route's rate or concurrency limit
    on_limit_wait: Callable[[], Any] | None


class ObservedApp(Protocol):
    """What :func:`enable` uses of the app: its settings (what is configured), its runner
    (to add run hooks) and its hooks. The HTTP servers it builds are given the app itself."""

    @property
    def settings(self) -> Settings: ...
    @property
    def runner(self) -> Runner: ...
    @property
    def hooks(self) -> ObservedHooks: ...


def metrics_wanted(app: ObservedApp) -> bool:
    s = app.settings
    return s.metrics_port is not None or s.api_port is not None or bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def _add_runner_hooks(app: ObservedApp, hooks: Any) -> None:
    current = app.runner.hooks
    current = [] if current is None else list(current) if isinstance(current, (list, tuple)) else [current]
    app.runner.hooks = [*current, hooks]


def _event_observer(metrics: Any) -> Callable[[str, str], None]:
    def observe(event_type: str, outcome: str) -> None:
        metrics.observe_event(event_type, outcome)
        if outcome == "dead":
            metrics.observe_dead()
    return observe


def enable(app: ObservedApp) -> list[Any]:
    """Install hooks and return the lifecycle components (servers, notifier) to start."""
    components: list[Any] = []
    s = app.settings
    if metrics_wanted(app):
        from orchestrator.ops import metrics

        _add_runner_hooks(app, metrics.MetricsHooks())
        app.hooks.event_observer = _event_observer(metrics)
        app.hooks.on_cron_leadership = lambda leading: metrics.set_leader("cron", leading)
        app.hooks.on_unordered = metrics.UNORDERED.inc
        app.hooks.on_limit_wait = metrics.LIMIT_WAITS.inc
        if s.metrics_port is not None:
            from orchestrator.ops.http_api import MetricsServer

            components.append(MetricsServer(app, s.metrics_host, s.metrics_port, s.api_token))
    if s.api_port is not None:
        from orchestrator.ops.http_api import ApiServer

        components.append(ApiServer(app, s.api_host, s.api_port, s.api_token))
    if os.environ.get("TOKIWA_WEBHOOK_URL"):
        from orchestrator.ops.webhooks import WebhookNotifier

        notifier = WebhookNotifier()
        _add_runner_hooks(app, notifier)
        components.append(notifier)
    for component in components:
        log.info("observability: %s", type(component).__name__)
    return components
