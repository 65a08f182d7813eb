"""The command lines: ``tokiwa-producer`` (publish, trigger, run-file, cron, run),
``inspect``, app loading, named exit codes, and the long-running process runtime (signals,
heartbeat) that ``tokiwa-worker`` uses too. Thin: they parse arguments and call the library.
"""

from __future__ import annotations
