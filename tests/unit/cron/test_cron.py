"""Cron expressions: grammar, tokiwa's AND rule, time zones, DST and clear errors."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from orchestrator.cron.expr import Cron, parse_slot, slot_iso
from orchestrator.errors import CronError

NY = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")


def successive(cron: Cron, start: datetime, n: int) -> list[str]:
    out, t = [], start
    for _ in range(n):
        t = cron.next_after(t)
        out.append(t.isoformat())
    return out


def test_every_five_minutes_matches_multiples_of_five_only():
    cron = Cron("*/5 * * * *", "UTC")
    assert cron.matches(datetime(2026, 1, 1, 10, 15, tzinfo=UTC))
    assert not cron.matches(datetime(2026, 1, 1, 10, 16, tzinfo=UTC))


def test_lists_ranges_and_stepped_ranges_combine():
    cron = Cron("0,30 9-17/4 * * *", "UTC")
    hours = {t.hour for t in cron.slots_between(datetime(2026, 1, 1, tzinfo=UTC),
                                                datetime(2026, 1, 2, tzinfo=UTC))}
    assert hours == {9, 13, 17}


def test_start_with_step_runs_to_the_field_maximum():
    cron = Cron("50/5 * * * *", "UTC")
    minutes = [t.minute for t in cron.slots_between(datetime(2026, 1, 1, tzinfo=UTC),
                                                    datetime(2026, 1, 1, 1, tzinfo=UTC))]
    assert minutes == [50, 55]


def test_day_of_month_and_day_of_week_are_anded_not_ored():
    cron = Cron("0 0 13 * 5", "UTC")  # Friday the 13th only
    fires = cron.slots_between(datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert [(t.month, t.day) for t in fires] == [(2, 13), (3, 13), (11, 13)]
    assert all(t.weekday() == 4 for t in fires)


def test_matches_applies_the_and_rule_when_only_one_day_field_matches():
    cron = Cron("0 0 13 * 5", "UTC")
    assert not cron.matches(datetime(2026, 1, 13, tzinfo=UTC))  # a Tuesday
    assert not cron.matches(datetime(2026, 1, 16, tzinfo=UTC))  # a Friday, not the 13th
    assert cron.matches(datetime(2026, 2, 13, tzinfo=UTC))


def test_sunday_is_day_of_week_zero():
    assert Cron("0 0 * * 0", "UTC").matches(datetime(2026, 1, 4, tzinfo=UTC))  # a Sunday


def test_next_after_is_strictly_after_and_drops_seconds():
    cron = Cron("* * * * *", "UTC")
    assert cron.next_after(datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)) == datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    assert cron.next_after(datetime(2026, 1, 1, 0, 0, 59, 999, tzinfo=UTC)) == datetime(2026, 1, 1, 0, 1, tzinfo=UTC)


def test_a_leading_sixth_field_is_seconds():
    cron = Cron("*/15 * * * * *", "UTC")
    assert cron.has_seconds
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert [t.second for t in cron.slots_between(start, start.replace(minute=1))] == [15, 30, 45, 0]
    assert not cron.matches(datetime(2026, 1, 1, 0, 0, 7, tzinfo=UTC))


def test_fields_match_wall_time_of_the_given_zone():
    cron = Cron("0 9 * * *", "Asia/Tokyo")
    nxt = cron.next_after(datetime(2026, 1, 1, 0, 30, tzinfo=UTC))  # 09:30 in Tokyo
    assert nxt == datetime(2026, 1, 2, 9, 0, tzinfo=TOKYO)
    assert cron.matches(datetime(2026, 1, 2, 0, 0, tzinfo=UTC))


def test_naive_datetimes_are_read_in_the_crons_zone():
    cron = Cron("0 9 * * *", NY)
    assert cron.matches(datetime(2026, 6, 1, 9, 0))
    assert cron.next_after(datetime(2026, 6, 1, 8, 0)).utcoffset().total_seconds() == -4 * 3600


def test_spring_forward_gap_time_fires_once_right_after_the_gap():
    cron = Cron("30 2 * * *", NY)
    assert successive(cron, datetime(2026, 3, 7, 12, tzinfo=NY), 2) == [
        "2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]


def test_fall_back_fixed_time_fires_once_at_its_first_occurrence():
    cron = Cron("30 1 * * *", NY)
    assert successive(cron, datetime(2026, 10, 31, 12, tzinfo=NY), 2) == [
        "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]


def test_fall_back_hourly_job_follows_real_time_through_the_repeated_hour():
    cron = Cron("0 * * * *", NY)
    assert successive(cron, datetime(2026, 11, 1, 0, 30, tzinfo=NY), 3) == [
        "2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T02:00:00-05:00"]


def test_spring_forward_hourly_job_skips_the_missing_hour():
    cron = Cron("0 * * * *", NY)
    assert successive(cron, datetime(2026, 3, 8, 0, 30, tzinfo=NY), 2) == [
        "2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00"]


@pytest.mark.parametrize(("expr", "field", "message"), [
    ("* 25 * * *", "hour", "hour: 25 is out of range 0-23"),
    ("60 * * * *", "minute", "minute: 60 is out of range 0-59"),
    ("* * 0 * *", "day-of-month", "day-of-month: 0 is out of range 1-31"),
    ("* * * 13 *", "month", "month: 13 is out of range 1-12"),
    ("* * * * 7", "day-of-week", "day-of-week: 7 is out of range 0-6"),
    ("61 * * * * *", "second", "second: 61 is out of range 0-59"),
    ("*/0 * * * *", "minute", "step '0'"),
    ("* * * * MON", "day-of-week", "'MON' is not a number"),
    ("* * * JAN *", "month", "'JAN' is not a number"),
    ("5-1 * * * *", "minute", "runs backwards"),
    ("1,,2 * * * *", "minute", "empty item"),
    ("? * * * *", "minute", "not a number"),
])
def test_an_invalid_field_is_an_error_naming_the_field(expr, field, message):
    with pytest.raises(CronError, match=message) as info:
        Cron(expr, "UTC")
    assert info.value.field == field
    assert info.value.expr == expr


@pytest.mark.parametrize("expr", ["* * * *", "* * * * * * *", "", "   "])
def test_a_wrong_number_of_fields_is_an_error(expr):
    with pytest.raises(CronError):
        Cron(expr, "UTC")


def test_an_expression_that_never_matches_a_real_date_is_refused():
    with pytest.raises(CronError, match="never matches"):
        Cron("0 0 30 2 *", "UTC")


def test_an_unknown_time_zone_is_an_error():
    with pytest.raises(CronError, match="unknown time zone"):
        Cron("* * * * *", "Mars/Olympus")


def test_slot_text_is_utc_and_round_trips():
    slot = datetime(2026, 3, 8, 3, 0, tzinfo=NY)
    assert slot_iso(slot) == "2026-03-08T07:00:00Z"
    assert parse_slot(slot_iso(slot)) == slot


def test_a_rare_but_possible_date_is_accepted():
    cron = Cron("0 0 29 2 1", "UTC")  # 29 February falling on a Monday
    assert cron.next_after(datetime(2000, 1, 1, tzinfo=UTC)) == datetime(2016, 2, 29, tzinfo=UTC)


@pytest.mark.parametrize("expr", ["30 1 * * *", "0 * * * *", "30 2 * * *", "*/20 * * * *", "*/30 * * * * *"])
@pytest.mark.parametrize("day", [datetime(2026, 3, 7, 22, tzinfo=NY), datetime(2026, 10, 31, 22, tzinfo=NY)])
def test_slots_between_agrees_with_next_after_across_dst(expr, day):
    cron = Cron(expr, NY)
    end = day + timedelta(hours=8)
    forward, t = [], cron.next_after(day)
    while t <= end:
        forward.append(t)
        t = cron.next_after(t)
    assert [s.astimezone(UTC) for s in cron.slots_between(day, end)] == [s.astimezone(UTC) for s in forward]


def test_slots_between_keeps_the_newest_slots_without_walking_the_whole_range():
    cron = Cron("* * * * * *", "UTC")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    began = time.perf_counter()
    newest = cron.slots_between(start, start + timedelta(days=1, microseconds=500), limit=2)
    assert time.perf_counter() - began < 0.5
    assert newest == [start + timedelta(days=1, seconds=-1), start + timedelta(days=1)]
