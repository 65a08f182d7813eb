"""Chatflows: runs serialized per conversation (in stream order, under a fenced lock), and
the conversation memory stores.
"""

from __future__ import annotations

from orchestrator._lazy import lazy_exports

_EXPORTS = {
    "ChatflowExecutor": "chatflow",
    "will_be_redone": "chatflow",
    "ConversationStore": "conversations",
    "DeltaConversationStore": "conversations",
    "InMemoryConversationStore": "conversations",
    "RedisConversationStore": "conversations",
    "apply_patch": "conversations",
    "check_cid": "conversations",
    "check_compact_after": "conversations",
    "check_memory": "conversations",
    "check_token": "conversations",
    "is_empty": "conversations",
    "shallow_diff": "conversations",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports('orchestrator.chat', _EXPORTS)
