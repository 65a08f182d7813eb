"""Every Redis key tokiwa uses is built here, and only here.

Keys are readable with ``redis-cli`` and all start with the namespace (default ``tokiwa``).
The README has a recipe for each. TTLs and units are stated next to each key.

Cluster readiness: the stream and the keys that a multi-key Lua script touches together
(the stream, its dead-letter stream) do not need a shared hash slot yet because P = 1 partition;
when partitions arrive the stream becomes ``{ns}:{events:p}`` and its scripts stay one-slot.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one namespace."""

    namespace: str = "tokiwa"

    # stream of every published event; consumer group ``workers`` (configurable).
    # Trimmed by MINID, never below the oldest entry a group still needs.
    @property
    def events(self) -> str:
        return f"{self.namespace}:events"

    # dead letters: original fields + reason, error, deliveries, failed_at. Never trimmed
    # automatically past ``dead_maxlen`` (approximate MAXLEN, default 100 000).
    @property
    def dead(self) -> str:
        return f"{self.namespace}:dead"

    # hash: worker id -> msgpack heartbeat. Entries older than 3 heartbeat intervals are stale.
    @property
    def workers(self) -> str:
        return f"{self.namespace}:workers"

    # zset: run id -> start time (epoch seconds); used for listing and pruning runs.
    @property
    def runs(self) -> str:
        return f"{self.namespace}:runs"

    # hash: one run record. Expires with the run store's retention (default 7 days).
    def run(self, run_id: str) -> str:
        return f"{self.namespace}:run:{run_id}"

    # list: a run's log lines, capped (LTRIM) and expiring with the run.
    def run_logs(self, run_id: str) -> str:
        return f"{self.namespace}:run:{run_id}:logs"

    # string: leader lease, value = holder id, PX ttl (ms).
    def leader(self, role: str) -> str:
        return f"{self.namespace}:leader:{role}"

    # counter: fencing epoch of a role, INCR on every acquisition; never expires.
    def leader_epoch(self, role: str) -> str:
        return f"{self.namespace}:leader:{role}:epoch"

    # string: conversation lock, value = holder token, PX ttl (ms), renewed while held.
    def conversation_lock(self, conversation_id: str) -> str:
        return f"{self.namespace}:lock:conv:{conversation_id}"

    # counter: fencing epoch of a conversation lock; never expires.
    def conversation_lock_epoch(self, conversation_id: str) -> str:
        return f"{self.namespace}:lock:conv:{conversation_id}:epoch"

    # hash: conversation memory snapshot (+ ``__epoch`` of the last writer's fencing token).
    def conversation(self, conversation_id: str) -> str:
        return f"{self.namespace}:conv:{conversation_id}"

    # list: conversation memory deltas since the snapshot, compacted every N.
    def conversation_deltas(self, conversation_id: str) -> str:
        return f"{self.namespace}:conv:{conversation_id}:deltas"

    # string: cron "fired" marker for (job, slot), SET NX, EX = 1 day.
    def cron_fired(self, job: str, slot: str) -> str:
        return f"{self.namespace}:cron:{job}:{slot}"

    # string: last fired slot of a cron job (for ``cron list``), no expiry.
    def cron_last(self, job: str) -> str:
        return f"{self.namespace}:cron:{job}:last"

    # string: cluster-wide claim of a ``once=True`` subscriber, SET NX, no expiry.
    def once(self, subscriber_name: str) -> str:
        return f"{self.namespace}:once:{subscriber_name}"

    # pub/sub channel of a relayed Miclow topic.
    def topic(self, topic: str) -> str:
        return f"{self.namespace}:topic:{topic}"

    # pub/sub pattern matching every relayed topic.
    @property
    def topic_pattern(self) -> str:
        return f"{self.namespace}:topic:*"

    # string: result of a remote run_workflow request (msgpack), EX = result_ttl_s.
    # list: the caller BLPOPs ``run_result`` + ``:notify`` to wait without polling.
    def run_result(self, run_id: str) -> str:
        return f"{self.namespace}:result:{run_id}"

    def run_result_notify(self, run_id: str) -> str:
        return f"{self.namespace}:result:{run_id}:notify"

    # list: stream ids of a conversation's events in publish order, one list per chatflow
    # route (its consumer group), RPUSH'ed atomically with the XADD by the publish script; a
    # chatflow run starts only when its id is the head. Without a group (``process_event``
    # called directly) the list is the conversation's own.
    def conversation_order(self, conversation_id: str, group: str | None = None) -> str:
        base = f"{self.namespace}:conv:{conversation_id}:order"
        return base if group is None else f"{base}:{group}"

    # hash: Miclow relay id -> msgpack heartbeat (host, pid, tasks, topics, at), written every
    # relay ``heartbeat_interval_s`` (default 2 s); entries older than 3 intervals are pruned
    # by any relay that reads the hash, and a relay deletes its own entry when it stops.
    @property
    def relays(self) -> str:
        return f"{self.namespace}:relays"

    # zset: event ids whose memory delta a conversation has applied (score = sequence), capped
    # to the newest N (default 10 000) so a redelivered event never applies twice; no expiry.
    def conversation_applied(self, conversation_id: str) -> str:
        return f"{self.namespace}:conv:{conversation_id}:applied"

    # string: stream id of a published event, set by the publish script with the XADD, PX =
    # ``publish_dedup_ms`` (default 60 s); a publish that finds it adds nothing (a resent
    # publish lands once).
    # stream: a lossless relay topic's frames (fields ``frame``, ``seq``), XADD MAXLEN ~ the
    # relay's ``lossless_maxlen``, expiring a day after its last write.
    def topic_stream(self, topic: str) -> str:
        return f"{self.namespace}:topicstream:{topic}"

    def published(self, event_id: str) -> str:
        return f"{self.namespace}:published:{event_id}"

    # hash: delivery group -> msgpack description of the registration behind it (kind, name,
    # workflow id, event types or pattern, conversation key path, when first declared, last
    # declared). Written by every worker (and producer with an app) that has the registration;
    # read by producers without the app (conversation keys, call by name) and ``inspect groups``.
    # An entry goes when its group is removed (``tokiwa-producer groups remove``).
    @property
    def routes(self) -> str:
        return f"{self.namespace}:routes"

    # zset: a flow-control limit of a route (kind "rate": start ids by ms in the last window;
    # kind "concurrency": holders by lease end ms), one per key value; PEXPIRE'd a little past
    # its window / lease, so idle ones go by themselves.
    def limit(self, route: str, kind: str, value: str) -> str:
        return f"{self.namespace}:limit:{kind}:{route}:{value}"

    # zset: delayed event id -> due time (epoch ms). Moved to the stream when due (by any worker,
    # atomically with the removal, so never twice); cancelled with ``inspect delayed cancel``.
    @property
    def delayed(self) -> str:
        return f"{self.namespace}:delayed"

    # hash: delayed event id -> msgpack of the stream fields and the conversation order lists to
    # append to when it is moved; removed with its ``delayed`` member.
    @property
    def delayed_events(self) -> str:
        return f"{self.namespace}:delayed:events"

    # string: a cancel request for a run: msgpack {by, at, reason}, EX = 1 day. A worker running
    # the run stops it; a worker about to start it records it ``cancelled`` instead.
    def cancel(self, run_id: str) -> str:
        return f"{self.namespace}:cancel:{run_id}"

    # zset: run ids with a cancel request (score = request time, epoch seconds), so workers
    # find requests with one read; pruned of entries older than a day by whoever writes.
    @property
    def cancels(self) -> str:
        return f"{self.namespace}:cancels"
