"""Wire form of a relayed Miclow topic message on ``{ns}:topic:{topic}`` (pub/sub).

The payload is msgpack of ``[1, origin_id, host, task, message]``. The relay (workers/)
reads and writes the same frames; a payload that is not a frame (``redis-cli PUBLISH
tokiwa:topic:orders hello``) is delivered as the plain message text.
"""

from __future__ import annotations

import msgpack

FRAME_VERSION = 1


def encode_topic_frame(origin: str, host: str, task: str, message: str | list[str]) -> bytes:
    """One frame; ``message`` may be a list (a run of messages the relay packs together)."""
    frame: bytes = msgpack.packb([FRAME_VERSION, origin, host, task, message], use_bin_type=True)
    return frame
