"""Cron: expressions (croniter, 5 or 6 fields), the scheduler and the leader-elected
scheduler that fires each (job, slot) at most once, and the app's cron job registry.
"""

from __future__ import annotations

from orchestrator._lazy import lazy_exports

_EXPORTS = {
    "Cron": "expr",
    "SystemClock": "expr",
    "parse_field": "expr",
    "parse_slot": "expr",
    "resolve_tz": "expr",
    "slot_iso": "expr",
    "CronRegistry": "jobs",
    "CronSpec": "jobs",
    "require_known": "jobs",
    "CronJob": "scheduler",
    "LeaderScheduler": "scheduler",
    "MissedSlotPolicy": "scheduler",
    "Scheduler": "scheduler",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports('orchestrator.cron', _EXPORTS)
