"""System commands a child sends to its relay (``system.*`` topics, any case).

| command | argument | effect | reply (on the requester's stdin) |
| --- | --- | --- | --- |
| ``system.subscribe-topic`` | topic | subscribe (idempotent) | ``system.subscribe-topic`` / the topic |
| ``system.unsubscribe-topic`` | topic | unsubscribe | same / the topic; error if not subscribed |
| ``system.status`` | ignored | — | ``system.status`` / JSON: tasks, pids, topics, hosts |
| ``system.function.<name>`` | input | start ``[[functions]]`` entry ``<name>`` | same / ``<name>``, or error |
| ``system.return`` | value | a function answers its caller | caller gets ``system.return`` / value |
| anything else | — | logged, counted as ``unknown_commands`` | ``system.error`` (reported, harmless) |

A task in Miclow mode (``protocol = "miclow"``) gets Miclow's replies and only those: no reply
to an unknown command; a command with an empty argument (other than ``system.status``,
``system.return`` and ``system.function.<name>``) is published as an ordinary message on its
topic, as Miclow does; a topic argument is not checked for whitespace; an unsubscribe that
finds no subscription answers ``error`` with the topic; an unknown function answers
``error`` with Miclow's text and adds a ``system.error`` record; ``system.status`` lists the
running instances only.

Commands run synchronously in the order the child wrote them, so a message a child
publishes right after ``system.subscribe-topic:X`` already finds the subscription in place
(upstream Miclow ran them asynchronously, newest first, and could lose that race).
In line framing a reply is ``topic:data`` (success) or ``system.error:topic: reason``; in
counted framing it is upstream's response record (topic, N+1, ``success``/``error``, data).
The status JSON is one line in line framing and pretty-printed in counted framing.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from orchestrator.errors import RelayError
from workers.relay.protocol import (
    ERROR_TOPIC,
    STATUS_COMMAND,
    encode_function_input,
    encode_message,
    encode_response,
)

if TYPE_CHECKING:
    from workers.relay.child import ChildProcess
    from workers.relay.core import Relay

log = logging.getLogger("tokiwa.relay")

FUNCTION_PREFIX = "system.function."
RETURN_COMMAND = "system.return"
#: commands Miclow runs with an empty argument (any other is published as a message instead)
_EMPTY_OK = (STATUS_COMMAND, RETURN_COMMAND)


def _miclow(child: ChildProcess) -> bool:
    return child.spec.protocol == "miclow"


class SystemCommands:
    """Dispatches one relay's ``system.*`` commands."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._handlers = {
            "system.subscribe-topic": self.subscribe,
            "system.unsubscribe-topic": self.unsubscribe,
            STATUS_COMMAND: self.status,
            RETURN_COMMAND: self.return_value,
        }

    @staticmethod
    def reply(child: ChildProcess, topic: str, ok: bool, data: str) -> None:
        child.deliver(encode_response(child.framing, topic, ok, data))

    def handle(self, child: ChildProcess, name: str, arg: str) -> None:
        """Run command ``name`` (lower-cased) with argument ``arg`` for ``child``."""
        if not arg and _miclow(child) and name not in _EMPTY_OK and not name.startswith(FUNCTION_PREFIX):
            self.relay.route(name, arg, child.name)  # Miclow: not a command, an ordinary message
            return
        handler = self._handlers.get(name)
        if handler is not None:
            handler(child, name, arg)
        elif name.startswith(FUNCTION_PREFIX) and len(name) > len(FUNCTION_PREFIX):
            self.function(child, name, arg)
        else:
            self.relay.counters["unknown_commands"] += 1
            log.warning("relay: unknown system command %r from task %s", name, child.name)
            if not _miclow(child):  # Miclow ignores it without a word
                self.reply(child, name, False, f"unknown system command {name}")

    def fail(self, child: ChildProcess, name: str, reason: str, miclow_reason: str | None = None) -> None:
        """An error reply; in Miclow mode with Miclow's text, followed by a ``system.error``
        record as Miclow's failed commands have."""
        if not _miclow(child):
            self.reply(child, name, False, reason)
            return
        self.reply(child, name, False, miclow_reason or reason)
        self.reply(child, ERROR_TOPIC, False, miclow_reason or reason)

    @staticmethod
    def _topic_arg(child: ChildProcess, name: str, arg: str) -> str | None:
        if _miclow(child) and arg:  # Miclow subscribes to whatever it is given
            return arg
        if not arg or any(c.isspace() for c in arg):
            SystemCommands.reply(child, name, False, f"expected a topic without whitespace, got {arg!r}")
            return None
        return arg

    def subscribe(self, child: ChildProcess, name: str, arg: str) -> None:
        topic = self._topic_arg(child, name, arg)
        if topic is not None:
            self.relay.topics.subscribe(child, topic)
            self.reply(child, name, True, topic)

    def unsubscribe(self, child: ChildProcess, name: str, arg: str) -> None:
        topic = self._topic_arg(child, name, arg)
        if topic is None:
            return
        if self.relay.topics.unsubscribe(child, topic):
            self.reply(child, name, True, topic)
        else:
            self.reply(child, name, False, topic if _miclow(child) else f"not subscribed to {topic}")

    def status(self, child: ChildProcess, name: str, arg: str) -> None:
        state: dict[str, Any] = self.relay.status()
        if _miclow(child):  # Miclow lists running instances only
            state["tasks"] = [t for t in state["tasks"] if t.get("alive")]
        indent = 2 if child.framing == "counted" else None
        self.reply(child, name, True, json.dumps(state, indent=indent, default=str))

    def return_value(self, child: ChildProcess, name: str, arg: str) -> None:
        caller = self.relay.caller_of(child)
        if caller is None or not caller.alive:
            log.warning("relay: system.return from task %s, which no running task called; dropped", child.name)
            return
        caller.deliver(encode_message(caller.framing, RETURN_COMMAND, arg))

    def function(self, child: ChildProcess, name: str, arg: str) -> None:
        fname = name[len(FUNCTION_PREFIX):]
        spec = self.relay.config.function(fname)
        if spec is None:
            self.fail(child, name, f"unknown function {fname}", f"Task '{fname}' not found in configuration")
            return
        if not self.relay.running:
            self.fail(child, name, "cancelled: the relay is stopping", "cancelled")
            return
        self.relay._spawn(self._start_function(child, name, spec, arg))  # noqa: SLF001 - owned by the relay

    async def _start_function(self, caller: ChildProcess, name: str, spec: Any, arg: str) -> None:
        try:
            instance = await self.relay.run_function(spec, caller, arg)
        except RelayError as exc:
            self.fail(caller, name, str(exc))
            return
        self.reply(caller, name, True, spec.task_name)
        instance.deliver(encode_function_input(instance.framing, caller.name, arg))
