"""Cron expressions, evaluated in a time zone, and the clock that schedulers and leases use.

``Cron("*/5 * * * *")`` takes tokiwa's five fields (minute hour day-of-month month
day-of-week) or six with a LEADING seconds field (``"*/2 * * * * *"`` = every two seconds).
Each field is ``*`` or a comma list of ``n``, ``a-b``, ``*/s``, ``a-b/s`` and ``a/s`` (from
``a`` to the field's maximum). Day-of-week is 0-6 with 0 = Sunday; 7, names (``MON``,
``JAN``) and ``? L W #`` are refused, as in tokiwa.

Unlike classic (Vixie) cron, day-of-month and day-of-week are AND-ed: ``0 0 13 * 5`` fires
only on a Friday the 13th, not on every 13th and every Friday. croniter does the calendar
walk with ``day_or=False``; the parsing and error messages are ours, so a bad expression
says which field is wrong (``hour: 25 is out of range 0-23``).

Daylight saving time (the zone's wall clock is what the fields match):
- a wall time that does not exist (spring forward, 02:30 in New York) fires at the first
  instant after the gap (03:00), once;
- a wall time that occurs twice (fall back, 01:30) fires once, at its first occurrence, when
  the hour field is fixed; with ``*`` in the hour field the job follows real time and fires
  in both repeated hours (``*/30 * * * *`` keeps firing every 30 real minutes).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from orchestrator.clock import SystemClock  # noqa: F401 - re-exported
from orchestrator.errors import CronError

# (name, lowest, highest) of each field, in expression order (seconds only in 6-field form).
_SECOND = ("second", 0, 59)
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12),
           ("day-of-week", 0, 6))
# how far ahead next_after looks before declaring an expression impossible (30 Feb ...);
# 29 February on a given weekday recurs within 28 years.
_MAX_YEARS = 30


def resolve_tz(tz: str | tzinfo | None) -> tzinfo:
    """A tzinfo for ``tz``: a zone name, a tzinfo, or None for the host's local zone
    (``$TZ``, else ``/etc/localtime``, else UTC)."""
    if isinstance(tz, tzinfo):
        return tz
    if isinstance(tz, str) and tz.strip():
        try:
            return ZoneInfo(tz.strip())
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise CronError(f"unknown time zone {tz!r}", field="tz") from exc
    if tz is not None:
        raise CronError(f"time zone must be a zone name or a tzinfo, got {tz!r}", field="tz")
    env_tz = os.environ.get("TZ", "").lstrip(":")
    if env_tz:
        try:
            return ZoneInfo(env_tz)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with open("/etc/localtime", "rb") as fh:
            return ZoneInfo.from_file(fh, key="localtime")
    except OSError:
        return UTC


def _parse_int(text: str, name: str, lo: int, hi: int) -> int:
    if not text.isdigit():
        raise CronError(f"{name}: {text!r} is not a number", field=name)
    value = int(text)
    if not lo <= value <= hi:
        raise CronError(f"{name}: {value} is out of range {lo}-{hi}", field=name)
    return value


def _parse_part(part: str, name: str, lo: int, hi: int) -> set[int]:
    base, slash, step_text = part.partition("/")
    step = 1
    if slash:
        if not step_text.isdigit() or int(step_text) < 1:
            raise CronError(f"{name}: step {step_text!r} must be a whole number >= 1", field=name)
        step = int(step_text)
    if base == "*":
        start, end = lo, hi
    elif "-" in base:
        a, _, b = base.partition("-")
        start, end = _parse_int(a, name, lo, hi), _parse_int(b, name, lo, hi)
        if start > end:
            raise CronError(f"{name}: range {base} runs backwards", field=name)
    else:
        start = _parse_int(base, name, lo, hi)
        end = hi if slash else start
    return set(range(start, end + 1, step))


def parse_field(text: str, name: str, lo: int, hi: int) -> frozenset[int]:
    """The values one field allows; CronError naming the field when it is invalid."""
    if not text:
        raise CronError(f"{name}: empty field", field=name)
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{name}: empty item in {text!r}", field=name)
        values |= _parse_part(part, name, lo, hi)
    return frozenset(values)


class Cron:
    """One cron expression in one time zone (see the module docstring for the grammar)."""

    def __init__(self, expr: str, tz: str | tzinfo | None = None) -> None:
        if not isinstance(expr, str) or not expr.strip():
            raise CronError(f"cron expression must be a non-blank string, got {expr!r}", expr=str(expr))
        parts = expr.split()
        if len(parts) not in (5, 6):
            raise CronError(
                f"cron expression {expr!r} has {len(parts)} fields; expected 5 "
                "(minute hour day-of-month month day-of-week) or 6 with a leading seconds field",
                expr=expr, field="expression")
        self.expr = " ".join(parts)
        self.has_seconds = len(parts) == 6
        self.tz = resolve_tz(tz)
        specs = ((_SECOND,) if self.has_seconds else ()) + _FIELDS
        try:
            self._sets = {name: parse_field(text, name, lo, hi)
                          for text, (name, lo, hi) in zip(parts, specs, strict=True)}
        except CronError as exc:
            exc.expr = expr
            raise
        self._hour_fixed = parts[-4] != "*"
        # fails loudly at registration for a calendar that never matches (30 February)
        self.next_after(datetime(2000, 1, 1, tzinfo=UTC))

    def __repr__(self) -> str:
        return f"Cron({self.expr!r}, tz={self.tz!s})"

    @property
    def resolution(self) -> timedelta:
        """One second for a 6-field expression, one minute otherwise."""
        return timedelta(seconds=1) if self.has_seconds else timedelta(minutes=1)

    def _local(self, dt: datetime) -> datetime:
        return dt.replace(tzinfo=self.tz) if dt.tzinfo is None else dt.astimezone(self.tz)

    def matches(self, dt: datetime) -> bool:
        """Whether ``dt`` (aware, or naive = in this cron's zone) is a firing time; seconds
        count only for a 6-field expression."""
        local = self._local(dt)
        s = self._sets
        weekday = (local.weekday() + 1) % 7  # Python: Monday 0; cron: Sunday 0
        return ((not self.has_seconds or local.second in s["second"])
                and local.minute in s["minute"] and local.hour in s["hour"]
                and local.day in s["day-of-month"] and local.month in s["month"]
                and weekday in s["day-of-week"])

    def next_after(self, dt: datetime) -> datetime:
        """The first firing time strictly after ``dt``, aware in this cron's zone."""
        local = self._local(dt).replace(microsecond=0)
        if not self.has_seconds:
            local = local.replace(second=0)
        it = croniter(self.expr, local, day_or=False, second_at_beginning=self.has_seconds,
                      max_years_between_matches=_MAX_YEARS)
        for _ in range(4):
            try:
                candidate = it.get_next(datetime)
            except CroniterBadDateError as exc:
                raise CronError(f"cron expression {self.expr!r} never matches a real date",
                                expr=self.expr, field="expression") from exc
            if not (self._hour_fixed and _is_repeat(candidate)):
                return candidate
        raise CronError(f"cron expression {self.expr!r} cannot be scheduled", expr=self.expr)

    def slots_between(self, start: datetime, end: datetime, limit: int = 10_000) -> list[datetime]:
        """Firing times t with ``start < t <= end``, oldest first: at most ``limit``, the newest.

        Walks backwards from ``end``, so the cost is O(limit), not O(end - start): the
        latest slot of a per-second job after a day of downtime costs one step, not 86 400.
        """
        if end <= start or limit < 1:
            return []
        step = 1 if self.has_seconds else 60
        end_utc = end.astimezone(UTC)
        floor = end_utc.replace(microsecond=0) - timedelta(seconds=end_utc.second % step)
        top = (floor + self.resolution).astimezone(self.tz)  # get_prev is strictly before this
        it = croniter(self.expr, top, day_or=False, second_at_beginning=self.has_seconds,
                      max_years_between_matches=_MAX_YEARS)
        out: list[datetime] = []
        while len(out) < limit:
            try:
                t = it.get_prev(datetime)
            except CroniterBadDateError:
                break
            if t <= start:
                break
            if not (self._hour_fixed and _is_repeat(t)):
                out.append(t)
        out.reverse()
        return out


def _is_repeat(dt: datetime) -> bool:
    """True for the second occurrence of a wall time repeated by a fall-back DST change."""
    before, after = dt.replace(fold=0).utcoffset(), dt.replace(fold=1).utcoffset()
    if before is None or after is None or before <= after:
        return False  # not ambiguous (or a spring-forward gap)
    return dt.utcoffset() == after


def slot_iso(dt: datetime) -> str:
    """The canonical text of a slot: UTC, second precision, ``2026-01-02T03:04:05Z``.
    Lexically ordered like the times themselves (the FIRE script compares them as text)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_slot(text: str | bytes) -> datetime:
    """Inverse of :func:`slot_iso`."""
    if isinstance(text, bytes):
        text = text.decode()
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
