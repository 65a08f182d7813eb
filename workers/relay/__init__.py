"""The Miclow relay: child processes from a TOML config exchanging ``topic:message`` lines,
routed between hosts over Redis pub/sub (or streams for lossless topics).
"""

from __future__ import annotations

from orchestrator._lazy import lazy_exports

_EXPORTS = {
    "ChildProcess": "child",
    "TaskExit": "child",
    "new_task_id": "child",
    "resolve_command": "child",
    "SystemCommands": "commands",
    "RelayConfig": "config",
    "TaskConfig": "config",
    "load_relay_config": "config",
    "parse_relay_config": "config",
    "Relay": "core",
    "RelayFatalError": "core",
    "STABLE_AFTER_S": "core",
    "check_topic": "core",
    "Output": "protocol",
    "OutputParser": "protocol",
    "encode_counted": "protocol",
    "encode_function_input": "protocol",
    "encode_line": "protocol",
    "encode_message": "protocol",
    "encode_response": "protocol",
    "parse_quoted": "protocol",
    "split_payload": "protocol",
    "strip_line_ending": "protocol",
    "TopicTable": "topics",
    "Outbox": "transport",
    "RelayTransport": "transport",
    "TaskGuard": "transport",
    "decode_frame": "transport",
    "frames_of": "transport",
    "publish_topic_message": "transport",
    "topic_stream_key": "transport",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports('workers.relay', _EXPORTS)
