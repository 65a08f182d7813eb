"""``tokiwa-producer inspect …``: look into the cluster (streams, pending, dead letters, leaders,
locks, workers, runs), requeue or purge dead letters, and purge the events stream.

Thin: each command parses its options, calls one :class:`~orchestrator.ops.inspector.Inspector`
method and prints the result as a readable table, or as JSON with ``--json`` (for scripts:
the JSON is exactly what the library returns).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import click
from redis.exceptions import RedisError

from orchestrator.broker.connection import create_redis
from orchestrator.cli import exitcodes
from orchestrator.cli.producer import (
    F,
    build_app,
    common_options,
    report_redis_error,
    run_async,
    setup_logging,
)
from orchestrator.errors import InvalidArgumentError, NotFoundError, TokiwaError
from orchestrator.ops.inspector import Inspector
from orchestrator.runs.stores import RedisRunStore

MAX_CELL = 60
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


# -- rendering --------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        value = f"{value:.1f}"
    text = str(value).replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Rows as a left-aligned text table; ``columns`` = [(HEADER, key)]."""
    cells = [[_cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max([len(header)] + [len(r[i]) for r in cells]) for i, (header, _) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def listing(what: str, columns: list[tuple[str, str]]) -> Callable[[list[dict[str, Any]]], str]:
    """A renderer: a table of ``columns``, or "no WHAT" when there are no rows."""
    return lambda rows: table(rows, columns) if rows else f"no {what}"


def when(epoch: float | None) -> str | None:
    return None if not epoch else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


async def _open(app: Any) -> tuple[Inspector, Callable[[], Awaitable[None]]]:
    """An Inspector and its closer. With a Redis URL it opens its own client and writes
    nothing (``app.connect()`` would create the stream and group); without one it starts the
    embedded server through the app."""
    url = app.settings.redis_url
    if url is None:
        await app.connect()
        return Inspector.from_app(app), app.close
    redis = create_redis(url)
    s = app.settings
    inspector = Inspector(redis, app.keys, s.group, run_store=RedisRunStore(redis, app.keys),
                          heartbeat_interval_s=s.heartbeat_interval_s)
    return inspector, redis.aclose


def _execute(settings: dict[str, Any], app_spec: str | None, call: Callable[[Inspector], Awaitable[Any]],
             as_json: bool, render: Callable[[Any], str]) -> None:
    """Connect, run one Inspector call, print it, exit with a named code."""
    setup_logging(settings.pop("log_level", None) or "WARNING")
    app = build_app(app_spec, mode="producer", **settings)

    async def go() -> int:
        close: Callable[[], Awaitable[None]] = app.close
        try:
            inspector, close = await _open(app)
            data = await call(inspector)
        except RedisError as exc:
            return report_redis_error(exc)
        except InvalidArgumentError as exc:
            click.echo(f"error: {exc}", err=True)
            return exitcodes.USAGE
        finally:
            await close()
        click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False) if as_json else render(data))
        return exitcodes.OK

    sys.exit(run_async(go()))


def leaf(func: F) -> F:
    """The options every inspect command has: --json plus the shared connection options."""
    return json_option(common_options(func))


# -- commands ---------------------------------------------------------------------------------
@click.group("inspect")
def inspect_group() -> None:
    """Look into the cluster through Redis (add --json for scripts)."""


def _render_streams(streams: list[dict[str, Any]]) -> str:
    out = [table(streams, [("STREAM", "stream"), ("LENGTH", "length"), ("FIRST", "first_id"), ("LAST", "last_id")])]
    for s in streams:
        for g in s["groups"]:
            out.append(f"\ngroup {g['name']} on {s['stream']}: pending {g['pending']}, lag {_cell(g['lag'])}, "
                       f"last delivered {g['last_delivered']}")
            if g["consumers"]:
                out.append(table(g["consumers"], [("CONSUMER", "name"), ("PENDING", "pending"),
                                                  ("IDLE_MS", "idle_ms"), ("INACTIVE_MS", "inactive_ms"),
                                                  ("LIVE", "live")]))
    return "\n".join(out)


@inspect_group.command()
@leaf
def streams(as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Stream lengths, groups, consumers, lag and pending counts."""
    _execute(settings, app_spec, lambda i: i.streams(), as_json, _render_streams)


def _render_pending(data: dict[str, Any]) -> str:
    per = ", ".join(f"{name}: {n}" for name, n in data["groups"].items()) or "no group"
    head = f"{data['count']} pending ({per})"
    if not data["entries"]:
        return head
    return head + "\n" + table(data["entries"], [("STREAM_ID", "stream_id"), ("GROUP", "group"), ("CONSUMER", "consumer"),
                                                  ("IDLE_MS", "idle_ms"), ("DELIVERIES", "deliveries"),
                                                  ("TYPE", "type")])


@inspect_group.command()
@click.option("--limit", default=100, show_default=True, help="Most entries to list (oldest first).")
@click.option("--consumer", default=None, help="Only this consumer's entries.")
@leaf
def pending(limit: int, consumer: str | None, as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Entries delivered but not acked: per consumer, idle time, deliveries."""
    _execute(settings, app_spec, lambda i: i.pending(limit=limit, consumer=consumer), as_json, _render_pending)


# -- dead letters -----------------------------------------------------------------------------
DEAD_COLUMNS = [("DEAD_ID", "dead_id"), ("TYPE", "type"), ("REASON", "reason"), ("DELIVERIES", "deliveries"),
                ("FAILED_AT", "failed"), ("ERROR", "error")]


def _render_dead(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no dead letters"
    return table([{**r, "failed": when(r["failed_at"])} for r in rows], DEAD_COLUMNS)


def _render_dead_one(d: dict[str, Any]) -> str:
    lines = [f"{k}: {_cell(d.get(k)) if k != 'error' else d.get(k)}" for k in
             ("dead_id", "stream_id", "event_id", "type", "reason", "deliveries", "consumer", "error")]
    lines.append(f"failed_at: {when(d.get('failed_at'))}")
    if d.get("event") is not None:
        lines.append("event: " + json.dumps(d["event"], indent=2, default=str, ensure_ascii=False))
    else:
        lines.append(f"event: undecodable ({d.get('undecodable')})")
    return "\n".join(lines)


@inspect_group.group()
def dead() -> None:
    """Dead letters: list, show, requeue, purge."""


@dead.command("list")
@click.option("--limit", default=50, show_default=True, help="Most entries to list (newest first).")
@leaf
def dead_list(limit: int, as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """The newest dead letters."""
    _execute(settings, app_spec, lambda i: i.dead_list(limit=limit), as_json, _render_dead)


@dead.command("show")
@click.argument("dead_id")
@leaf
def dead_show(dead_id: str, as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """One dead letter with its decoded event."""
    _execute(settings, app_spec, lambda i: i.dead_show(dead_id), as_json, _render_dead_one)


def _render_requeued(rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if r["stream_id"]]
    missing = [r["dead_id"] for r in rows if not r["stream_id"]]
    lines = [f"requeued {len(done)} dead letter(s)"]
    lines += [f"  {r['dead_id']} -> {r['stream_id']}" for r in done]
    if missing:
        lines.append(f"not found: {', '.join(missing)}")
    return "\n".join(lines)


@dead.command("requeue")
@click.argument("dead_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Requeue every dead letter there is now (oldest first; one that "
                                                  "dies again meanwhile is not requeued twice).")
@leaf
def dead_requeue(dead_ids: tuple[str, ...], all_: bool, as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Put dead letters back on the events stream (DEAD_ID … or --all)."""
    if bool(dead_ids) == all_:
        raise click.UsageError("give DEAD_ID(s) or --all, not both or neither")

    async def call(i: Inspector) -> list[dict[str, Any]]:
        return await (i.requeue_all() if all_ else i.requeue(list(dead_ids)))

    _execute(settings, app_spec, call, as_json, _render_requeued)


@dead.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@leaf
def dead_purge(yes: bool, as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Delete every dead letter."""
    if not yes:
        click.confirm("Delete every dead letter?", abort=True)

    async def call(i: Inspector) -> dict[str, int]:
        return {"purged": await i.purge()}

    _execute(settings, app_spec, call, as_json, lambda d: f"purged {d['purged']} dead letter(s)")


# -- the events stream -----------------------------------------------------------------------
class NotConfirmed(TokiwaError):
    """The operator did not confirm a destructive command: nothing was changed."""


@inspect_group.group()
def events() -> None:
    """The events stream: purge it."""


def _render_purged(d: dict[str, Any]) -> str:
    if d["up_to"] is None:
        return f"{d['stream']} is empty: nothing purged ({d['delayed_kept']} delayed event(s) kept)"
    per = ", ".join(f"{g}: {n}" for g, n in d["groups"].items()) or "no group"
    return (f"purged {d['purged']} entries of {d['stream']} up to {d['up_to']}\n"
            f"pending entries dropped per group: {per}\n"
            f"ids removed from conversation order lists: {d['order_ids_removed']}\n"
            f"delayed events kept: {d['delayed_kept']} (published when due; `inspect delayed cancel` drops one)")


@events.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask: purge at once (for scripts).")
@leaf
def events_purge(yes: bool, as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Delete every entry of the events stream (asks you to type the namespace first).

    Each consumer group stays, its pending entries up to the purge are acked and its
    last-delivered id moves past them; entries published meanwhile stay. Delayed events,
    dead letters and run records are not touched. Exit 0 when purged, 1 when not confirmed."""

    async def call(i: Inspector) -> dict[str, Any]:
        if not yes:
            streams = await i.streams()
            ev = streams[0]
            pending = sum(g["pending"] for g in ev["groups"])
            click.echo(f"{ev['stream']}: {ev['length']} entries, {len(ev['groups'])} group(s) with {pending} "
                       "pending: all of them will be deleted", err=True)
            namespace = i.keys.namespace
            try:
                typed = click.prompt("type the namespace to confirm", default="", show_default=False, err=True)
            except click.exceptions.Abort:
                typed = None
            if typed is None or not sys.stdin.isatty():
                click.echo("", err=True)  # end the prompt's line
            if typed != namespace:
                raise NotConfirmed(f"not confirmed (the namespace is {namespace!r}): nothing was purged; "
                                   "type it at the prompt, or pass --yes")
        return await i.purge_events()

    _execute(settings, app_spec, call, as_json, _render_purged)


# -- leases, workers, runs --------------------------------------------------------------------
@inspect_group.command()
@leaf
def leaders(as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Leader leases: role, holder, ttl, fencing epoch."""
    cols = [("ROLE", "role"), ("HOLDER", "holder"), ("TTL_MS", "ttl_ms"), ("EPOCH", "epoch")]
    _execute(settings, app_spec, lambda i: i.leaders(), as_json, listing("leader leases", cols))


@inspect_group.command()
@leaf
def locks(as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Conversation locks: conversation, holder token, ttl, fencing epoch."""
    cols = [("CONVERSATION", "conversation_id"), ("HOLDER", "holder"), ("TTL_MS", "ttl_ms"), ("EPOCH", "epoch")]
    _execute(settings, app_spec, lambda i: i.locks(), as_json, listing("conversation locks", cols))


@inspect_group.command()
@leaf
def workers(as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Worker heartbeats: host, pid, in flight, processed, age, stale."""
    cols = [("ID", "id"), ("HOST", "host"), ("PID", "pid"), ("MODE", "mode"), ("IN_FLIGHT", "in_flight"),
            ("PROCESSED", "processed"), ("FAILED", "failed"), ("AGE_S", "age_s"), ("STALE", "stale")]
    _execute(settings, app_spec, lambda i: i.workers(), as_json, listing("worker heartbeats", cols))


@inspect_group.command("groups")
@leaf
def groups_command(as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Consumer groups (one per route): lag, pending, live workers; WAITING = work that no
    live worker reads (a worker with that registration is needed)."""
    cols = [("GROUP", "group"), ("KIND", "kind"), ("NAME", "name"), ("LAG", "lag"), ("PENDING", "pending"),
            ("LIVE_WORKERS", "live_workers"), ("WAITING", "waiting")]
    _execute(settings, app_spec, lambda i: i.groups(), as_json, listing("consumer groups", cols))


@inspect_group.command("remove-group")
@click.argument("group")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Even while a live worker reads it.")
@leaf
def remove_group_command(group: str, yes: bool, force: bool, as_json: bool, app_spec: str | None,
                         **settings: Any) -> None:
    """Remove the consumer group GROUP of a retired registration (and its advert): its waiting
    events are dropped for it, and the stream is no longer kept for it."""
    if not yes:
        click.confirm(f"Remove group {group!r} and drop what waits in it?", abort=True)

    async def call(i: Inspector) -> dict[str, Any]:
        return await i.remove_group(group, force=force)

    _execute(settings, app_spec, call, as_json,
             lambda d: f"removed group {d['group']} ({d['lag']} undelivered, {d['pending']} pending dropped)")


@inspect_group.group()
def delayed() -> None:
    """Delayed events: list, cancel one before it is due."""


@delayed.command("list")
@click.option("--limit", default=100, show_default=True)
@leaf
def delayed_list(limit: int, as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Delayed events in due order."""
    cols = [("EVENT_ID", "event_id"), ("TYPE", "type"), ("DUE_MS", "due_ms"), ("DUE_IN_S", "due_in_s")]
    _execute(settings, app_spec, lambda i: i.delayed(limit=limit), as_json, listing("delayed events", cols))


@delayed.command("cancel")
@click.argument("event_id")
@leaf
def delayed_cancel(event_id: str, as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Cancel the delayed event EVENT_ID (it is never published)."""
    async def call(i: Any) -> dict[str, Any]:
        if not await i.cancel_delayed(event_id):
            raise NotFoundError(f"no delayed event {event_id!r} is waiting")
        return {"cancelled": event_id}
    _execute(settings, app_spec, call, as_json, lambda d: f"cancelled delayed event {d['cancelled']}")


@inspect_group.group()
def runs() -> None:
    """Workflow runs: list (with filters), show one."""


def _run_status(r: dict[str, Any]) -> str:
    """The status, with ``(stale?)`` on a running record not rewritten for a while (its worker
    may be dead: see docs/observability.md, "Live run records")."""
    from orchestrator.runs.stores import is_stale

    status = str(r.get("status"))
    if r.get("stale") or ("stale" not in r and "updated_at" in r and is_stale(r, time.time())):
        return f"{status} (stale?)"
    return status


def _render_runs(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs"
    shaped = [{**r, "started": when(r["started_at"]), "status": _run_status(r),
               "nodes": ", ".join(f"{n}={s['state']}" for n, s in r["task_summary"].items())} for r in rows]
    return table(shaped, [("RUN_ID", "run_id"), ("WORKFLOW", "workflow"), ("STATUS", "status"),
                          ("STARTED", "started"), ("DURATION_MS", "duration_ms"), ("NODES", "nodes")])


def _render_run(r: dict[str, Any]) -> str:
    lines = [f"run {r['run_id']}  workflow {r.get('workflow_name')}  status {_run_status(r)}",
             f"started {when(r.get('started_at'))}  finished {when(r.get('finished_at'))}  "
             f"duration_ms {_cell(r.get('duration_ms'))}"]
    if r.get("worker_id") or r.get("updated_at"):
        lines.append(f"worker {_cell(r.get('worker_id'))}  updated {when(r.get('updated_at'))}")
    if r.get("error"):
        lines.append(f"error: {json.dumps(r['error'], default=str)}")
    if isinstance(resumed := r.get("resumed_from"), dict):  # a redelivered run went on from checkpoints
        lines.append(f"resumed: {', '.join(resumed.get('nodes') or []) or 'no node'} from checkpoints of "
                     f"{', '.join(resumed.get('workers') or []) or '-'} (delivery {_cell(resumed.get('deliveries'))})")
    rows = [{"node": n, **s} for n, s in r["task_summary"].items()]
    lines.append(table(rows, [("NODE", "node"), ("STATE", "state"), ("ATTEMPTS", "attempts"),
                              ("DURATION_MS", "duration_ms")]))
    nodes = r.get("nodes")
    for name, node in (nodes.items() if isinstance(nodes, dict) else ()):
        if isinstance(node, dict) and node.get("traceback"):
            lines.append(f"traceback of node {name}:")
            lines += [f"  {line}" for line in str(node["traceback"]).splitlines()]
    if r.get("logs"):
        lines.append("logs:")
        lines += [f"  {line}" for line in r["logs"]]
    return "\n".join(lines)


@runs.command("list")
@click.option("--status", default=None, help="running, succeeded, failed, timed_out or cancelled.")
@click.option("--workflow", default=None, help="Workflow name or id.")
@click.option("--limit", default=50, show_default=True)
@leaf
def runs_list(status: str | None, workflow: str | None, limit: int, as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """Runs, newest first."""
    _execute(settings, app_spec, lambda i: i.runs(status=status, workflow=workflow, limit=limit),
             as_json, _render_runs)


@runs.command("show")
@click.argument("run_id")
@click.option("--tail", default=None, type=int, help="Only the last N log lines.")
@leaf
def runs_show(run_id: str, tail: int | None, as_json: bool, app_spec: str | None, **settings: Any) -> None:
    """One run: status, nodes, error and log lines."""
    _execute(settings, app_spec, lambda i: i.run(run_id, tail=tail), as_json, _render_run)
