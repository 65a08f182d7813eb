"""The Miclow line protocol: what a child writes on stdout/stderr, and what it reads on stdin.

Pure functions and one small state machine; no I/O. The relay (:mod:`workers.relay.core`) feeds
every line a child writes into an :class:`OutputParser` and writes what the encoders return
to the child's stdin.

Output (stdout and stderr, parsed independently), following SEED-SEMANTICS.md §1.3 / §1.11.
Two dialects, chosen per task by its ``protocol`` (see docs/relay.md):

* ``tokiwa`` (default) reads the seed README's unquoted ``topic:message`` form **and** Miclow's
  quoted forms; ``miclow`` reads Miclow's quoted forms only, as Miclow's own parser does.
* ``topic:message`` (README form, ``tokiwa`` only): split at the **first** colon, the message
  trimmed on both sides. The text before the colon must *look like a topic*
  (:data:`BARE_TOPIC`: a lower-case ASCII letter, then lower-case letters, digits, ``_``,
  ``-``, ``.``; or ``system.`` in any case followed by a command name), and the message must
  not start with ``//`` (a URL such as ``http://host``). Otherwise the line is plain: so
  ``{"a": 1}``, ``ValueError: boom``, ``WARNING:root:x``, ``Result: ok``,
  ``json.decoder.JSONDecodeError: x``, ``Processing item 3: done`` and
  ``http://example.com`` stay output.
* ``"topic": value`` (Miclow's quoted single-line form; ``\\"`` and ``\\\\`` escape inside
  the quotes; any non-empty topic). The value is trimmed.
* ``"topic"::`` … ``::"topic"`` (Miclow's block form): the lines in between, each with its
  own line ending, form one multi-line message.
* A bare ``system.status`` line is the status command (``tokiwa`` only: the README lists it
  without a colon).
* Any other line is *plain*: it is published, line ending removed, on the task's
  ``stdout_topic`` / ``stderr_topic`` (``<task>.stdout`` / ``<task>.stderr``).

A topic that starts with ``system.`` (any case) is a *command*; its name is lower-cased.
Lines that look like protocol but are broken (``: x`` with an empty topic, an unterminated
quote, a block end with no block, a block still open at end of file) are plain lines with
:attr:`Output.problem` set, so the relay can count and report them.

Stdin framings (per task, option ``stdin_framing``; ``protocol = "miclow"`` defaults to counted):

* ``line`` (the README's, default of ``tokiwa``): one ``topic:message`` line per message. A
  multi-line payload is sent as one ``topic:line`` record per line (line framing cannot carry
  newlines).
* ``counted`` (Miclow's, §1.4): the topic line, a count line N, then N data lines.
  System responses add a status line (``success`` / ``error``) counted in N.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

SYSTEM_PREFIX = "system."
#: a block (``"t"::`` … ``::"t"``) that grows past this many characters is dropped and reported.
MAX_BLOCK_CHARS = 8 << 20
STATUS_COMMAND = "system.status"
ERROR_TOPIC = "system.error"
FRAMINGS = ("line", "counted")
#: output dialects: ``tokiwa`` (README form and quoted forms), ``miclow`` (quoted forms only).
DIALECTS = ("tokiwa", "miclow")
#: what may stand before the colon of an unquoted ``topic:message`` line (README form).
BARE_TOPIC = re.compile(r"[a-z][a-z0-9_.\-]*")
#: an unquoted command: ``system.`` in any case, then a command name.
BARE_COMMAND = re.compile(r"system\.[a-z0-9_.\-]+", re.IGNORECASE)

OutputKind = Literal["message", "plain", "command"]
Framing = Literal["line", "counted"]
Dialect = Literal["tokiwa", "miclow"]


@dataclass(frozen=True, slots=True)
class Output:
    """One parsed unit of child output.

    ``kind`` is ``message`` (publish ``data`` on ``topic``), ``plain`` (publish ``data`` on
    the task's plain topic, which is ``topic`` here) or ``command`` (``topic`` is the
    lower-cased ``system.*`` command, ``data`` its trimmed argument). ``problem`` is set when
    the line was malformed protocol (it is then delivered as a plain line). ``raw`` is the
    line as the child wrote it (line ending removed) for single-line forms, None for a block
    (see :func:`written_lines`).
    """

    kind: OutputKind
    topic: str
    data: str
    problem: str | None = None
    raw: str | None = field(default=None, compare=False)


def written_lines(out: Output) -> list[str]:
    """The lines the child wrote for ``out``, to show it as the task's output."""
    if out.raw is not None:
        return [out.raw]
    if out.kind != "message":
        return [out.data]
    topic = out.topic.replace("\\", "\\\\").replace('"', '\\"')
    return [f'"{topic}"::', *split_payload(out.data), f'::"{topic}"']


def bare_topic(text: str) -> bool:
    """Whether ``text`` may be the topic of an unquoted ``topic:message`` line: a README-style
    lower-case name (``task_queue``, ``orders.eu``) or a ``system.`` command in any case."""
    return BARE_TOPIC.fullmatch(text) is not None or BARE_COMMAND.fullmatch(text) is not None


def strip_line_ending(raw: str) -> str:
    """``raw`` without one trailing ``\\n``, ``\\r\\n`` or ``\\r``."""
    if raw.endswith("\n"):
        raw = raw[:-1]
    if raw.endswith("\r"):
        raw = raw[:-1]
    return raw


def parse_quoted(line: str) -> tuple[str, str] | None:
    """Split ``"topic"rest`` into ``(topic, rest)``; None when the quote never closes.

    ``line`` starts with ``"``. A backslash inside the quotes escapes the next character.
    """
    chars: list[str] = []
    i, end = 1, len(line)
    while i < end:
        ch = line[i]
        if ch == "\\" and i + 1 < end:
            chars.append(line[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(chars), line[i + 1 :]
        chars.append(ch)
        i += 1
    return None


def _message(topic: str, data: str, raw: str) -> Output:
    """A message or, when ``topic`` starts with ``system.`` (any case), a command."""
    if topic[:7].lower() == SYSTEM_PREFIX:
        return Output("command", topic.lower(), data.strip(), raw=raw)
    return Output("message", topic, data, raw=raw)


class OutputParser:
    """Classifies the lines of one output stream (stdout or stderr) of one child.

    Stateful only for the block form. :meth:`feed` returns None while a block is being
    collected; :meth:`finish` flushes a block left open at end of file (as upstream does).
    ``dialect`` ``miclow`` reads the quoted forms only (an unquoted line is always plain).
    """

    __slots__ = ("plain_topic", "max_block_chars", "readme_form", "_block_topic", "_block_lines", "_block_size")

    def __init__(self, plain_topic: str, max_block_chars: int = MAX_BLOCK_CHARS, dialect: Dialect = "tokiwa") -> None:
        self.plain_topic = plain_topic
        self.max_block_chars = max_block_chars
        self.readme_form = dialect != "miclow"
        self._block_topic: str | None = None
        self._block_lines: list[str] = []
        self._block_size = 0

    def _plain(self, line: str, problem: str | None = None) -> Output:
        return Output("plain", self.plain_topic, line, problem)

    def feed(self, raw: str) -> Output | None:
        """Classify one line (with or without its line ending)."""
        if self._block_topic is not None:
            return self._feed_block(raw)
        line = strip_line_ending(raw)
        if not line:
            return self._plain(line)
        first = line[0]
        if first == '"':
            return self._feed_quoted(line)
        if first == " " or first == "\t":
            return self._plain(line)
        if line.startswith('::"'):
            return self._plain(line, "block end without a block start")
        return self._feed_colon(line) if self.readme_form else self._plain(line)

    def _feed_colon(self, line: str) -> Output:
        idx = line.find(":")
        if idx < 0:
            if line.strip().lower() == STATUS_COMMAND:
                return Output("command", STATUS_COMMAND, "", raw=line)
            return self._plain(line)
        topic = line[:idx].rstrip()
        if not topic:
            return self._plain(line, "empty topic before ':'")
        rest = line[idx + 1 :]
        if not bare_topic(topic) or rest.startswith("//"):
            return self._plain(line)  # prose, a log or exception line, JSON, a URL
        return _message(topic, rest.strip(), line)

    def _feed_quoted(self, line: str) -> Output | None:
        parsed = parse_quoted(line)
        if parsed is None:
            return self._plain(line, "unterminated quoted topic")
        topic, rest = parsed
        if not topic:
            return self._plain(line, "empty quoted topic")
        if rest == "::":
            self._block_topic, self._block_lines, self._block_size = topic, [], 0
            return None
        rest = rest.lstrip()
        if not rest.startswith(":"):
            return self._plain(line)
        return _message(topic, rest[1:].strip(), line)

    def _feed_block(self, raw: str) -> Output | None:
        line = strip_line_ending(raw)
        if line.startswith('::"'):
            parsed = parse_quoted(line[2:])
            if parsed is not None and parsed[1] == "" and parsed[0] == self._block_topic:
                return self._close_block()
        self._block_lines.append(raw if raw.endswith("\n") else raw + "\n")
        self._block_size += len(raw)
        if self._block_size > self.max_block_chars:
            topic = self._block_topic
            self._block_topic, self._block_lines, self._block_size = None, [], 0
            return Output("plain", self.plain_topic, "", f"block {topic!r} longer than {self.max_block_chars} chars dropped")
        return None

    def _close_block(self) -> Output:
        topic = self._block_topic or ""
        data = "".join(self._block_lines)
        self._block_topic, self._block_lines, self._block_size = None, [], 0
        if topic[:7].lower() == SYSTEM_PREFIX:
            return Output("command", topic.lower(), data.strip())
        return Output("message", topic, data)

    @property
    def in_block(self) -> bool:
        return self._block_topic is not None

    def finish(self) -> Output | None:
        """Flush a block that is still open (end of file): its partial payload is a message
        whose ``problem`` says the block was not closed."""
        if self._block_topic is None:
            return None
        out = self._close_block()
        return Output(out.kind, out.topic, out.data, "block not closed at end of output")


def split_payload(data: str) -> list[str]:
    """The data lines of a payload: split at ``\\n``, a trailing newline dropped, ``\\r``
    before ``\\n`` dropped; an empty payload has no lines (upstream §1.4)."""
    if not data:
        return []
    if data.endswith("\n"):
        data = data[:-1]
    return [part[:-1] if part.endswith("\r") else part for part in data.split("\n")]


def encode_line(topic: str, data: str) -> bytes:
    """Line framing: ``topic:data\\n``, one record per line of a multi-line payload."""
    if "\n" not in data and "\r" not in data:
        return f"{topic}:{data}\n".encode()
    lines = split_payload(data) or [""]
    return "".join(f"{topic}:{line.replace(chr(13), '')}\n" for line in lines).encode()


def encode_counted(topic: str, data: str) -> bytes:
    """Counted framing: ``topic``, N, then the N data lines."""
    lines = split_payload(data)
    body = "".join(line + "\n" for line in lines)
    return f"{topic}\n{len(lines)}\n{body}".encode()


def encode_message(framing: Framing, topic: str, data: str) -> bytes:
    """A topic message for a child's stdin in the given framing."""
    return encode_counted(topic, data) if framing == "counted" else encode_line(topic, data)


def encode_response(framing: Framing, topic: str, ok: bool, data: str) -> bytes:
    """A system response (reply to one command) for the requesting child's stdin.

    Counted framing follows upstream: topic, N+1, ``success``/``error``, N data lines.
    Line framing: ``topic:data`` on success, ``system.error:topic: data`` on error.
    """
    if framing == "counted":
        lines = split_payload(data)
        body = "".join(line + "\n" for line in lines)
        status = "success" if ok else "error"
        return f"{topic}\n{len(lines) + 1}\n{status}\n{body}".encode()
    if ok:
        return encode_line(topic, data)
    return encode_line(ERROR_TOPIC, f"{topic}: {data}")


def encode_function_input(framing: Framing, caller: str, data: str) -> bytes:
    """The record that starts a function instance's work.

    Counted framing follows upstream: ``system.function``, N+1, the caller's task name, N
    data lines. Line framing: ``system.function:data`` (the caller is in the
    ``MICLOW_CALLER_TASK`` environment variable of the function's process).
    """
    if framing == "counted":
        lines = split_payload(data)
        body = "".join(line + "\n" for line in lines)
        return f"system.function\n{len(lines) + 1}\n{caller}\n{body}".encode()
    return encode_line("system.function", data)
