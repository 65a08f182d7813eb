"""Every Redis key tokiwa uses is built here, and only here.

Keys are readable with ``redis-cli`` and all carry the namespace (default ``tokiwa``). The
README's key table says for each family what bounds it (a TTL, a cap, or what removes it).

Hash slots. Every key an atomic step touches together (one Lua script, one MULTI) shares one
Redis Cluster hash slot, because they share a hash tag, the part in braces:

* ``{ns:p}`` - partition ``p`` of the event streams: its stream, dead letters, delayed events,
  publish markers and conversation order lists (the publish script writes them together);
* ``{ns:conv:<id>}`` - one conversation: its memory, deltas, applied ids and lock;
* ``{ns:leader:<role>}`` - one leader lease, its epoch, and (role ``cron``) the cron jobs' state;
* ``{ns:runs}`` - the run records and their index; ``{ns:cancels}`` - cancel requests;
* ``{ns:result:<id>}`` - one remote run's result and its notify list.

Keys no script shares with another (the worker and relay heartbeats, adverts, once claims,
limits, lossless topic streams) need no tag. ``tests/integration/core/test_slots.py`` checks that
every script and transaction stays in one slot, so the single-Redis layout is cluster-ready.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    """The keys of one partition of the event streams; they share the hash tag ``{ns:p}``."""

    namespace: str
    index: int

    @property
    def tag(self) -> str:
        return f"{{{self.namespace}:{self.index}}}"

    # stream of the partition's events; one consumer group per registration
    # (``workers:<route>``). Trimmed by MINID, never below the oldest entry a group still needs.
    @property
    def events(self) -> str:
        return f"{self.tag}:events"

    # dead letters: original fields + reason, error, deliveries, failed_at. Approximate
    # MAXLEN ``dead_maxlen`` (default 100 000).
    @property
    def dead(self) -> str:
        return f"{self.tag}:dead"

    # zset: delayed event id -> due time (epoch ms). Moved to the stream when due (by any
    # worker, atomically with the removal, so never twice); ``inspect delayed cancel`` drops one.
    @property
    def delayed(self) -> str:
        return f"{self.tag}:delayed"

    # hash: delayed event id -> msgpack of the stream fields and the conversation order lists
    # to append to when it is moved; removed with its ``delayed`` member.
    @property
    def delayed_events(self) -> str:
        return f"{self.tag}:delayed:events"

    # string: stream id of a published event, set by the publish script with the XADD, PX =
    # ``publish_dedup_ms``; a publish that finds it adds nothing (a resent publish lands once).
    def published(self, event_id: str) -> str:
        return f"{self.tag}:published:{event_id}"

    # list: stream ids of a conversation's events in publish order, one list per chatflow
    # route (its consumer group), RPUSH'ed atomically with the XADD by the publish script; a
    # chatflow run starts only when its id is the head, and removes it when it ends. Without a
    # group (``process_event`` called directly) the list is the conversation's own.
    def conversation_order(self, conversation_id: str, group: str | None = None) -> str:
        base = f"{self.tag}:order:{conversation_id}"
        return base if group is None else f"{base}:{group}"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one namespace."""

    namespace: str = "tokiwa"

    # -- partitions of the event streams --------------------------------------------------
    def partition(self, index: int) -> PartitionKeys:
        """The keys of partition ``index`` (0 .. ``Settings.partitions`` - 1)."""
        return PartitionKeys(self.namespace, index)

    def partitions(self, count: int) -> list[PartitionKeys]:
        return [PartitionKeys(self.namespace, p) for p in range(count)]

    # partition 0's keys, the whole layout when ``partitions`` is 1 (the default)
    @property
    def events(self) -> str:
        return self.partition(0).events

    @property
    def dead(self) -> str:
        return self.partition(0).dead

    @property
    def delayed(self) -> str:
        return self.partition(0).delayed

    @property
    def delayed_events(self) -> str:
        return self.partition(0).delayed_events

    def published(self, event_id: str, partition: int = 0) -> str:
        return self.partition(partition).published(event_id)

    def conversation_order(self, conversation_id: str, group: str | None = None, partition: int = 0) -> str:
        return self.partition(partition).conversation_order(conversation_id, group)

    # SCAN patterns that match every key of the namespace (tagged ones start with the brace)
    @property
    def all_patterns(self) -> tuple[str, str]:
        return f"{self.namespace}:*", f"{{{self.namespace}:*"

    # hash: the namespace's layout (field ``partitions``), written once by the first process
    # that connects (HSETNX); a process set to another number of partitions refuses to start.
    @property
    def layout(self) -> str:
        return f"{self.namespace}:layout"

    # -- workers, relays, routes ----------------------------------------------------------
    # hash: worker id -> msgpack heartbeat. Entries older than 3 heartbeat intervals are stale.
    @property
    def workers(self) -> str:
        return f"{self.namespace}:workers"

    # hash: Miclow relay id -> msgpack heartbeat (host, pid, tasks, topics, at), written every
    # relay ``heartbeat_interval_s`` (default 2 s); entries older than 3 intervals are pruned
    # by any relay that reads the hash, and a relay deletes its own entry when it stops.
    @property
    def relays(self) -> str:
        return f"{self.namespace}:relays"

    # hash: delivery group -> msgpack description of the registration behind it (kind, name,
    # workflow id, event types or pattern, conversation key path, when first declared, last
    # declared). Written by every worker (and producer with an app) that has the registration;
    # read by producers without the app (conversation keys, call by name) and ``inspect groups``.
    # An entry goes when its group is removed (``tokiwa-producer groups remove``).
    @property
    def routes(self) -> str:
        return f"{self.namespace}:routes"

    # -- runs -----------------------------------------------------------------------------
    # zset: run id -> start time (epoch seconds); used for listing and pruning runs. Bound:
    # entries older than ``run_retention_s`` go at every save, and a save that finds more than
    # ``run_records_max`` + 1% removes the oldest (but running) runs with their keys.
    @property
    def runs(self) -> str:
        return f"{{{self.namespace}:runs}}"

    # hash: one run record. EX = ``run_retention_s`` (default 7 days) after its last write;
    # removed earlier with its logs and checkpoints when the index is past ``run_records_max``.
    def run(self, run_id: str) -> str:
        return f"{self.runs}:{run_id}"

    # list: a run's log lines, capped (LTRIM) and expiring with the run.
    def run_logs(self, run_id: str) -> str:
        return f"{self.run(run_id)}:logs"

    # hash: a run's node checkpoints (node id -> msgpack {status, attempts, output, times, worker_id}),
    # written under the run's owner token (orchestrator.runs.checkpoints). TTL: the run record's
    # (each write copies the run hash's PTTL; the run store re-expires and prunes it with the
    # record). Bound: one field per node of the workflow.
    def run_nodes(self, run_id: str) -> str:
        return f"{self.run(run_id)}:nodes"

    # string: result of a remote run_workflow request (msgpack), EX = result_ttl_s.
    # list: the caller BLPOPs ``run_result`` + ``:notify`` to wait without polling.
    def run_result(self, run_id: str) -> str:
        return f"{{{self.namespace}:result:{run_id}}}"

    def run_result_notify(self, run_id: str) -> str:
        return f"{self.run_result(run_id)}:notify"

    # zset: run ids with a cancel request (score = request time, epoch seconds), so workers
    # find requests with one read; pruned of entries older than a day by whoever writes.
    @property
    def cancels(self) -> str:
        return f"{{{self.namespace}:cancels}}"

    # string: a cancel request for a run: msgpack {by, at, reason}, EX = 1 day. A worker running
    # the run stops it; a worker about to start it records it ``cancelled`` instead.
    def cancel(self, run_id: str) -> str:
        return f"{self.cancels}:{run_id}"

    # -- leases ---------------------------------------------------------------------------
    # string: leader lease, value = holder id, PX ttl (ms).
    def leader(self, role: str) -> str:
        return f"{{{self.namespace}:leader:{role}}}"

    # counter: fencing epoch of a role, INCR on every acquisition; never expires.
    def leader_epoch(self, role: str) -> str:
        return f"{self.leader(role)}:epoch"

    # hash: one cron job's last fired slot: ``slot`` (ISO UTC) and ``token`` (the firing
    # claim, ``<holder id>/<random>``). In the cron leader's slot: the fire script checks the
    # lease and moves ``slot`` forward in one step, so a slot at or before it never fires
    # again. One key per job, EX = the job's period + the missed-slot window + 1 day, renewed
    # by every fire: a job removed from the code leaves a key that expires by itself.
    def cron_job(self, job: str) -> str:
        return f"{self.leader('cron')}:job:{job}"

    # string: cluster-wide claim of a ``once=True`` subscriber, SET NX, no expiry (it must
    # outlive every worker, or the subscriber would run again). Bound: one per ``once=True``
    # subscriber name in the app's code.
    def once(self, subscriber_name: str) -> str:
        return f"{self.namespace}:once:{subscriber_name}"

    # -- conversations --------------------------------------------------------------------
    def _conv(self, conversation_id: str) -> str:
        return f"{{{self.namespace}:conv:{conversation_id}}}"

    # The conversation's memory keys (snapshot, deltas, applied ids, lock epoch) all expire
    # ``conversation_ttl_s`` (default 30 days; 0 = never) after the conversation's last memory
    # write, which renews them together (chat/conversations.py, APPLY_DELTA).
    # hash: conversation memory snapshot (+ ``__epoch`` of the last writer's fencing token).
    def conversation(self, conversation_id: str) -> str:
        return self._conv(conversation_id)

    # list: conversation memory deltas since the snapshot, compacted every N.
    def conversation_deltas(self, conversation_id: str) -> str:
        return f"{self._conv(conversation_id)}:deltas"

    # zset: event ids whose memory delta a conversation has applied (score = sequence), capped
    # to the newest N (default 10 000) so a redelivered event never applies twice.
    def conversation_applied(self, conversation_id: str) -> str:
        return f"{self._conv(conversation_id)}:applied"

    # string: conversation lock, value = holder token, PX ttl (ms), renewed while held.
    def conversation_lock(self, conversation_id: str) -> str:
        return f"{self._conv(conversation_id)}:lock"

    # counter: fencing epoch of a conversation lock, seeded from Redis's clock (ms) when it is
    # created, so one that expired never hands out a token a stale holder still has.
    def conversation_lock_epoch(self, conversation_id: str) -> str:
        return f"{self._conv(conversation_id)}:lock:epoch"

    # -- relay ----------------------------------------------------------------------------
    # pub/sub channel of a relayed Miclow topic.
    def topic(self, topic: str) -> str:
        return f"{self.namespace}:topic:{topic}"

    # pub/sub pattern matching every relayed topic.
    @property
    def topic_pattern(self) -> str:
        return f"{self.namespace}:topic:*"

    # stream: a lossless relay topic's frames (fields ``frame``, ``seq``), XADD MAXLEN ~ the
    # relay's ``lossless_maxlen``, expiring a day after its last write.
    def topic_stream(self, topic: str) -> str:
        return f"{self.namespace}:topicstream:{topic}"

    # -- flow control ---------------------------------------------------------------------
    # zset: a flow-control limit of a route (kind "rate": start ids by ms in the last window;
    # kind "concurrency": holders by lease end ms), one per key value; PEXPIRE'd a little past
    # its window / lease, so idle ones go by themselves.
    def limit(self, route: str, kind: str, value: str) -> str:
        return f"{self.namespace}:limit:{kind}:{route}:{value}"


def partition_of(key: str, suffix: str) -> tuple[str, int] | None:
    """``(namespace, partition)`` of a partition key ``{ns:p}<suffix>`` (e.g. ``":events"``),
    or None when ``key`` is not one (so ``SCAN`` results can be read back)."""
    if not (key.startswith("{") and key.endswith("}" + suffix)):
        return None
    ns, _, index = key[1: -len(suffix) - 1].rpartition(":")
    return (ns, int(index)) if ns and index.isdigit() else None
