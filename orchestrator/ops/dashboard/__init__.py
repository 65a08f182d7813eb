"""A live web dashboard over one namespace: runs (with each run's DAG), workers, streams and
consumer groups, dead letters (requeue and purge with the bearer token), cron jobs and
leaders, conversation locks, relays and their topics, delayed events.

``data`` reads what the pages show (through the Inspector); ``routes`` serves the page, its
static files (``static/``: plain HTML, JS and CSS, no external resource) and the JSON it
polls. The worker's HTTP API mounts it at ``/dashboard``; ``tokiwa-producer dashboard``
serves it alone. See docs/dashboard.md.
"""

from __future__ import annotations

from orchestrator.ops.dashboard.data import DashboardData, run_graph
from orchestrator.ops.dashboard.routes import MOUNT, STATIC_DIR, Dashboard, bearer_ok, json_errors

__all__ = ["MOUNT", "STATIC_DIR", "Dashboard", "DashboardData", "bearer_ok", "json_errors", "run_graph"]
