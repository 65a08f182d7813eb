"""tokiwa: a distributed, Redis-backed orchestrator for events, cron jobs and DAG workflows."""
