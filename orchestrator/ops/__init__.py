"""Operating a fleet: Prometheus metrics, the HTTP API, webhooks, the inspector behind
``tokiwa-producer inspect``, worker heartbeats, and the switch that turns them on.
"""

from __future__ import annotations

from orchestrator._lazy import lazy_exports

_EXPORTS = {
    "WorkerBeat": "heartbeats",
    "decode_heartbeat": "heartbeats",
    "heartbeat_age": "heartbeats",
    "worker_beats": "heartbeats",
    "ApiServer": "http_api",
    "MetricsServer": "http_api",
    "Inspector": "inspector",
    "dead_entry": "inspector",
    "run_summary": "inspector",
    "ClusterGauges": "metrics",
    "MetricsHooks": "metrics",
    "mark_process_dead": "metrics",
    "metric_names": "metrics",
    "multiprocess_dir": "metrics",
    "observe_dead": "metrics",
    "observe_event": "metrics",
    "observe_relay_overflow": "metrics",
    "prepare_multiprocess_dir": "metrics",
    "refresh_gauges": "metrics",
    "scrape": "metrics",
    "set_leader": "metrics",
    "enable": "observability",
    "metrics_wanted": "observability",
    "WebhookNotifier": "webhooks",
    "WebhookSettings": "webhooks",
    "build_body": "webhooks",
    "load_webhook_settings": "webhooks",
    "sign": "webhooks",
    "verify": "webhooks",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports('orchestrator.ops', _EXPORTS)
