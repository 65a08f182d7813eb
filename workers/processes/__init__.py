"""Process management: detached workers (start / ps / stop / logs, one folder per instance),
and the supervisor behind ``tokiwa-worker run --processes N``.
"""

from __future__ import annotations
