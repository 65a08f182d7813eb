"""The Miclow line protocol: output classification and stdin framings."""

from __future__ import annotations

import asyncio

import pytest

from workers.relay.protocol import (
    Output,
    OutputParser,
    encode_counted,
    encode_function_input,
    encode_line,
    encode_message,
    encode_response,
    parse_quoted,
    split_payload,
)
from workers.relay.transport import FRAME_MAX_CHARS, decode_frame, encode_frame, frames_of


def parse(line: str) -> Output | None:
    return OutputParser("t.stdout").feed(line)


# -- README form --------------------------------------------------------------------------
def test_topic_and_message_are_split_at_the_first_colon_and_trimmed() -> None:
    assert parse("task_queue: value: with colon \n") == Output("message", "task_queue", "value: with colon")


def test_topic_case_is_kept_in_the_quoted_form() -> None:
    assert parse('"Orders": x') == Output("message", "Orders", "x")


def test_an_unquoted_capitalised_word_before_a_colon_is_prose() -> None:
    assert parse("Orders: x") == Output("plain", "t.stdout", "Orders: x")


def test_message_may_be_empty() -> None:
    assert parse("results:") == Output("message", "results", "")


def test_line_without_colon_is_plain_output_on_the_stdout_topic() -> None:
    assert parse("hello world\n") == Output("plain", "t.stdout", "hello world")


def test_line_with_whitespace_in_the_topic_is_plain() -> None:
    assert parse("Processing item 3: done") == Output("plain", "t.stdout", "Processing item 3: done")


def test_line_starting_with_a_space_is_plain() -> None:
    assert parse("  key: value").kind == "plain"


def test_empty_line_is_plain_and_not_malformed() -> None:
    assert parse("\n") == Output("plain", "t.stdout", "")


def test_empty_topic_is_plain_and_reported_as_malformed() -> None:
    out = parse(": orphan message")
    assert out.kind == "plain" and out.data == ": orphan message"
    assert out.problem == "empty topic before ':'"


def test_crlf_line_ending_is_stripped() -> None:
    assert parse("a:b\r\n") == Output("message", "a", "b")


# -- system commands ----------------------------------------------------------------------
def test_system_prefix_makes_a_command_with_a_lower_cased_name() -> None:
    assert parse("System.Subscribe-Topic: NewTopic") == Output("command", "system.subscribe-topic", "NewTopic")


def test_bare_system_status_line_is_the_status_command() -> None:
    assert parse("SYSTEM.STATUS\n") == Output("command", "system.status", "")


def test_unknown_system_command_is_still_a_command_for_the_relay_to_report() -> None:
    assert parse("system.reboot:now") == Output("command", "system.reboot", "now")


def test_topic_named_system_without_dot_is_an_ordinary_topic() -> None:
    assert parse("system:hi") == Output("message", "system", "hi")


# -- upstream quoted forms ----------------------------------------------------------------
def test_quoted_single_line_form_keeps_spaces_inside_the_quotes() -> None:
    assert parse('"my topic" :  v  ') == Output("message", "my topic", "v")


def test_quoted_value_keeps_its_own_quotes() -> None:
    assert parse('"k": " v "').data == '" v "'


def test_quoted_topic_unescapes_backslashes() -> None:
    assert parse_quoted(r'"a\"b\\c": x') == ('a"b\\c', ": x")


def test_unterminated_quote_is_plain_and_malformed() -> None:
    out = parse('"oops: x')
    assert out.kind == "plain" and out.problem == "unterminated quoted topic"


def test_quoted_topic_without_colon_is_plain_prose() -> None:
    assert parse('"Hello" he said') == Output("plain", "t.stdout", '"Hello" he said')


def test_start_marker_with_trailing_text_is_a_single_line_message() -> None:
    assert parse('"k":: x') == Output("message", "k", ": x")


def test_quoted_system_command_is_a_command() -> None:
    assert parse('"system.subscribe-topic": news') == Output("command", "system.subscribe-topic", "news")


def test_block_form_collects_lines_with_their_endings() -> None:
    parser = OutputParser("t.stdout")
    assert parser.feed('"doc"::\n') is None
    assert parser.feed("line 1\n") is None
    assert parser.feed("line 2\r\n") is None
    assert parser.feed('::"doc"\n') == Output("message", "doc", "line 1\nline 2\r\n")
    assert not parser.in_block


def test_block_payload_may_contain_other_markers() -> None:
    parser = OutputParser("t.stdout")
    parser.feed('"a"::')
    assert parser.feed('"b"::') is None
    assert parser.feed('::"b"') is None
    assert parser.feed('::"a"') == Output("message", "a", '"b"::\n::"b"\n')


def test_block_end_without_a_start_is_plain_and_malformed() -> None:
    out = parse('::"doc"')
    assert out.kind == "plain" and out.problem == "block end without a block start"


def test_block_still_open_at_end_of_output_is_flushed_and_reported() -> None:
    parser = OutputParser("t.stdout")
    parser.feed('"doc"::')
    parser.feed("partial")
    out = parser.finish()
    assert out == Output("message", "doc", "partial\n", "block not closed at end of output")
    assert parser.finish() is None


def test_block_on_a_system_topic_is_a_command() -> None:
    parser = OutputParser("t.stdout")
    parser.feed('"system.subscribe-topic"::')
    parser.feed("news")
    assert parser.feed('::"system.subscribe-topic"') == Output("command", "system.subscribe-topic", "news")


# -- stdin framings -----------------------------------------------------------------------
def test_line_framing_writes_topic_colon_message() -> None:
    assert encode_line("orders", "A-001") == b"orders:A-001\n"


def test_line_framing_sends_one_record_per_line_of_a_multi_line_payload() -> None:
    assert encode_line("doc", "a\r\nb\n") == b"doc:a\ndoc:b\n"


def test_counted_framing_writes_topic_count_and_lines() -> None:
    assert encode_counted("doc", "a\nb\n") == b"doc\n2\na\nb\n"


def test_counted_framing_of_an_empty_payload_has_no_data_lines() -> None:
    assert encode_counted("doc", "") == b"doc\n0\n"


def test_split_payload_drops_the_trailing_newline_and_carriage_returns() -> None:
    assert split_payload("a\r\n\nb\n") == ["a", "", "b"]


@pytest.mark.parametrize("framing,expected", [("line", b"t:m\n"), ("counted", b"t\n1\nm\n")])
def test_encode_message_follows_the_framing(framing: str, expected: bytes) -> None:
    assert encode_message(framing, "t", "m") == expected


def test_counted_response_carries_a_status_line() -> None:
    assert encode_response("counted", "system.subscribe-topic", True, "x") == b"system.subscribe-topic\n2\nsuccess\nx\n"
    assert encode_response("counted", "system.unsubscribe-topic", False, "x") == (
        b"system.unsubscribe-topic\n2\nerror\nx\n"
    )


def test_line_response_error_goes_on_system_error() -> None:
    assert encode_response("line", "system.unsubscribe-topic", False, "not subscribed to x") == (
        b"system.error:system.unsubscribe-topic: not subscribed to x\n"
    )


def test_function_input_carries_the_caller_in_counted_framing() -> None:
    assert encode_function_input("counted", "main", "in") == b"system.function\n2\nmain\nin\n"
    assert encode_function_input("line", "main", "in") == b"system.function:in\n"


# -- Redis wire frames ----------------------------------------------------------------------
def test_a_frame_round_trips_origin_task_and_message() -> None:
    assert decode_frame(encode_frame("r1", "host-a", "web", "A-001")) == ("r1", "host-a", "web", ["A-001"])


def test_a_frame_may_carry_a_run_of_messages() -> None:
    assert decode_frame(encode_frame("r1", "h", "web", ["a", "b"]))[3] == ["a", "b"]


def test_a_foreign_payload_is_delivered_as_the_message_itself() -> None:
    assert decode_frame(b"hello from redis-cli") == ("", "redis", "", ["hello from redis-cli"])


def test_consecutive_messages_of_one_task_and_topic_share_a_frame_in_order() -> None:
    batch = [("t", "1", "a"), ("t", "2", "a"), ("u", "3", "a"), ("t", "4", "a"), ("t", "5", "b")]
    assert frames_of(batch) == [("t", "a", ["1", "2"]), ("u", "a", ["3"]), ("t", "a", ["4"]), ("t", "b", ["5"])]


def test_a_frame_stops_growing_at_its_size_limit() -> None:
    big = "x" * (FRAME_MAX_CHARS // 2 + 1)
    assert [len(run[2]) for run in frames_of([("t", big, "a")] * 3)] == [1, 1, 1]


def test_frames_written_by_the_app_side_are_read_by_the_relay() -> None:
    from orchestrator.topics import encode_topic_frame

    assert decode_frame(encode_topic_frame("app-1", "h", "app", "x")) == ("app-1", "h", "app", ["x"])


def test_an_over_long_block_is_dropped_and_reported() -> None:
    parser = OutputParser("t.stdout", max_block_chars=10)
    parser.feed('"doc"::')
    assert parser.feed("12345\n") is None
    out = parser.feed("67890\n")
    assert out.kind == "plain" and out.data == "" and "longer than 10" in out.problem
    assert parser.feed("a:b") == Output("message", "a", "b")


# -- the publisher's per-task outboxes (no Redis: queueing only) ------------------------------
def _transport(lossless: str | None = None):
    import re

    from orchestrator.keys import Keys
    from workers.relay.transport import RelayTransport

    return RelayTransport("redis://127.0.0.1:1/0", Keys("t"), "r1", "h", lambda *a: None,
                          lossless=re.compile(lossless) if lossless else None)


async def test_the_publisher_takes_from_every_task_in_turn() -> None:
    transport = _transport()
    for i in range(5000):
        transport.publish_nowait("noise", str(i), "chatty")
    transport.publish_nowait("ping", "1", "pinger")
    batch = transport._take()  # noqa: SLF001
    assert ("ping", "1", "pinger", None) in batch  # not behind 5000 messages of another task
    assert [m for t, m, task, _ in batch if task == "chatty"] == [str(i) for i in range(len(batch) - 1)]


async def test_a_full_outbox_drops_and_counts_on_its_own_task_only() -> None:
    transport = _transport()
    transport.outbox("chatty", 10)
    accepted = [transport.publish_nowait("noise", str(i), "chatty") for i in range(15)]
    assert accepted == [True] * 10 + [False] * 5
    assert transport.publish_nowait("ping", "1", "pinger")
    assert transport.outbox_stats("chatty") == {"outbox": 10, "outbox_max": 10, "publish_dropped": 5}
    assert transport.outbox_stats("pinger")["publish_dropped"] == 0 and transport.publish_dropped == 5
    assert transport.room("chatty") is None  # drops, but its writer is never made to wait


async def test_a_lossless_message_is_queued_past_the_bound_and_its_writer_waits() -> None:
    transport = _transport(lossless=r"orders\..*")
    transport.outbox("w", 3)
    assert all(transport.publish_nowait("orders.x", str(i), "w") for i in range(5))
    assert transport.outbox_stats("w") == {"outbox": 5, "outbox_max": 3, "publish_dropped": 0}
    wait = transport.room("w")
    assert wait is not None
    waiter = asyncio.ensure_future(wait)
    await asyncio.sleep(0)
    assert not waiter.done()
    transport._take()  # noqa: SLF001 - the publisher took them
    await asyncio.wait_for(waiter, 1)
    assert transport.room("w") is None


async def test_a_stream_reader_skips_resent_frames_and_counts_trimmed_ones() -> None:
    from workers.relay.transport import _StreamState

    got: list[list[str]] = []

    async def on_stream(topic, messages, host, task):
        got.append(messages)

    transport = _transport(lossless="t")
    transport._on_stream = on_stream  # noqa: SLF001
    state = _StreamState("0-0")

    async def entry(seq: int, messages: list[str]) -> None:
        frame = encode_frame("r9", "h", "w", messages)
        await transport._stream_entry("t", state, {b"frame": frame, b"seq": str(seq).encode()})  # noqa: SLF001

    await entry(0, ["a", "b"])
    await entry(0, ["a", "b"])  # sent again after a send whose reply was lost
    await entry(1, ["b", "c"])  # overlaps by one
    await entry(6, ["g"])  # 3, 4, 5 were trimmed before this relay read them
    assert got == [["a", "b"], ["c"], ["g"]]
    assert (transport.stream_duplicates, transport.stream_lost, transport.stream_received) == (3, 3, 4)
