"""System commands a child sends to its relay (``system.*`` topics, any case).

| command | argument | effect | reply (on the requester's stdin) |
| --- | --- | --- | --- |
| ``system.subscribe-topic`` | topic | subscribe (idempotent) | ``system.subscribe-topic`` / the topic |
| ``system.unsubscribe-topic`` | topic | unsubscribe | same / the topic; error if not subscribed |
| ``system.status`` | ignored | — | ``system.status`` / JSON: tasks, pids, topics, hosts |
| ``system.function.<name>`` | input | start ``[[functions]]`` entry ``<name>`` | same / ``<name>``, or error |
| ``system.return`` | value | a function answers its caller | caller gets ``system.return`` / value |
| anything else | — | logged, counted as ``unknown_commands`` | ``system.error`` (reported, harmless) |

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
from workers.relay.protocol import STATUS_COMMAND, encode_function_input, encode_message, encode_response

if TYPE_CHECKING:
    from workers.relay.child import ChildProcess
    from workers.relay.core import Relay

log = logging.getLogger("tokiwa.relay")

FUNCTION_PREFIX = "system.function."
RETURN_COMMAND = "system.return"


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
        handler = self._handlers.get(name)
        if handler is not None:
            handler(child, name, arg)
        elif name.startswith(FUNCTION_PREFIX) and len(name) > len(FUNCTION_PREFIX):
            self.function(child, name, arg)
        else:
            self.relay.counters["unknown_commands"] += 1
            log.warning("relay: unknown system command %r from task %s", name, child.name)
            self.reply(child, name, False, f"unknown system command {name}")

    @staticmethod
    def _topic_arg(child: ChildProcess, name: str, arg: str) -> str | None:
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
            self.reply(child, name, False, f"not subscribed to {topic}")

    def status(self, child: ChildProcess, name: str, arg: str) -> None:
        state: dict[str, Any] = self.relay.status()
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
            self.reply(child, name, False, f"unknown function {fname}")
            return
        if not self.relay.running:
            self.reply(child, name, False, "cancelled: the relay is stopping")
            return
        self.relay._spawn(self._start_function(child, name, spec, arg))  # noqa: SLF001 - owned by the relay

    async def _start_function(self, caller: ChildProcess, name: str, spec: Any, arg: str) -> None:
        try:
            instance = await self.relay.run_function(spec, caller, arg)
        except RelayError as exc:
            self.reply(caller, name, False, str(exc))
            return
        self.reply(caller, name, True, spec.task_name)
        instance.deliver(encode_function_input(instance.framing, caller.name, arg))
