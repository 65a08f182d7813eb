"""The Orchestrator's cron side: jobs registered on the app, fired by a LeaderScheduler.

Jobs are validated when they are registered (croniter via :class:`orchestrator.cron.expr.Cron`),
kept here, and handed to a :class:`LeaderScheduler` when the app starts in ``producer`` or
``all`` mode: every producer campaigns for ``{ns}:leader:cron``, only the leader fires, and
each (job, slot) fires at most once cluster-wide. Worker mode never runs cron.

The registry does not know the app: it uses the few things :class:`CronHost` lists.

Its time zone, leader lease and missed-slot policy are the settings ``cron_tz``,
``cron_lease_ms`` and ``cron_missed_policy`` (flags, ``TOKIWA_*``, the config file), read
when the scheduler is built, so ``configure()`` before ``start()`` applies them. A value the
app gave its constructor (``Orchestrator(cron_tz=...)``) is used where the settings leave the
field unset, so the precedence is the settings' own: flags > env > file > the app > defaults.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.config import Settings
from orchestrator.errors import ConflictError, InvalidArgumentError, NotFoundError
from orchestrator.keys import Keys

if TYPE_CHECKING:  # imported lazily: an app without cron never loads croniter
    from orchestrator.cron.scheduler import LeaderScheduler
    from orchestrator.leader import LeaderElector
    from orchestrator.workflow.model import Workflow

log = logging.getLogger("tokiwa.cron")

_DEFAULTS: dict[str, Any] = {name: Settings.model_fields[name].default
                             for name in ("cron_tz", "cron_lease_ms", "cron_missed_policy")}


@dataclass(slots=True)
class CronSpec:
    id: str
    expr: str
    name: str
    handler: Callable[..., Any]
    kind: str  # job | event | workflow


class CronHooks(Protocol):
    """The app's hook that the cron registry calls (``orchestrator.app.AppHooks`` has it)."""

    #: ``fn(leading)`` when this process gains (True) or loses (False) cron leadership
    on_cron_leadership: Callable[[bool], Any] | None


class CronHost(Protocol):
    """What the cron registry uses of the app: its Redis, key names and worker id (the leader
    election and the jobs' state keys), its mode (a worker never runs cron), what the jobs
    do (publish an event, start a workflow) and its hooks."""

    @property
    def redis(self) -> Any: ...  # the async Redis client, None until connect()
    @property
    def keys(self) -> Keys: ...
    @property
    def worker_id(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def hooks(self) -> CronHooks: ...
    async def connect(self) -> None: ...
    async def publish(self, type: str, payload: Any = None,  # noqa: A002
                      metadata: Mapping[str, Any] | None = None) -> Any: ...
    async def run_workflow(self, workflow: str, input: Any = None, context: Any = None,  # noqa: A002
                           *, wait: bool = True) -> Any: ...


class CronRegistry:
    """Cron jobs of one app, and the leader-elected scheduler that fires them."""

    def __init__(self, host: CronHost, *, tz: str | None = None, lease_ms: int | None = None,
                 missed_policy: str | None = None, missed_window_s: float = 3_600.0,
                 check_interval_s: float | None = None) -> None:
        self.host = host
        self._given: dict[str, Any] = {"cron_tz": tz, "cron_lease_ms": lease_ms, "cron_missed_policy": missed_policy}
        self.missed_window_s = missed_window_s
        self.check_interval_s = check_interval_s
        self._specs: dict[str, CronSpec] = {}
        self.scheduler: LeaderScheduler | None = None
        self.elector: LeaderElector | None = None

    # -- settings ---------------------------------------------------------------------------
    def _setting(self, name: str) -> Any:
        """``name`` from the host's settings when they set it (flag, env, file), else the
        constructor's value, else the settings' default."""
        settings = getattr(self.host, "settings", None)
        given = self._given[name]
        if settings is None:
            return given if given is not None else _DEFAULTS[name]
        if name in settings.model_fields_set or given is None:
            return getattr(settings, name)
        return given

    @property
    def tz(self) -> str | None:
        value: str | None = self._setting("cron_tz")
        return value

    @property
    def lease_ms(self) -> int:
        return int(self._setting("cron_lease_ms"))

    @property
    def missed_policy(self) -> str:
        return str(self._setting("cron_missed_policy"))

    # -- registration -----------------------------------------------------------------------
    def add(self, expr: str, name: str, handler: Callable[..., Any], kind: str = "job") -> str:
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgumentError(f"a cron job needs a non-blank name, got {name!r}")
        if not callable(handler):
            raise InvalidArgumentError(f"cron job {name!r}: handler must be callable")
        if name in self._specs:
            raise ConflictError(f"a cron job named {name!r} is already registered")
        from orchestrator.cron.expr import Cron

        Cron(expr, self.tz)  # invalid expressions fail here, naming the bad field
        spec = CronSpec(str(uuid.uuid5(uuid.NAMESPACE_URL, f"tokiwa:cron:{name}")), expr, name, handler, kind)
        self._specs[name] = spec
        if self.scheduler is not None:
            self.scheduler.add_job(expr, name, handler)
        return spec.id

    def _find(self, ref: str) -> CronSpec | None:
        return self._specs.get(ref) or next((s for s in self._specs.values() if s.id == ref), None)

    def remove(self, ref: str) -> bool:
        spec = self._find(ref)
        if spec is None:
            return False
        del self._specs[spec.name]
        if self.scheduler is not None:
            self.scheduler.remove_job(spec.name)
        return True

    def is_scheduled(self, ref: str) -> bool:
        return self._find(ref) is not None

    @property
    def specs(self) -> list[CronSpec]:
        return list(self._specs.values())

    # -- the three kinds ------------------------------------------------------------------------
    def event_handler(self, event_type: str, payload: Any, metadata: dict[str, Any] | None) -> Callable[..., Any]:
        async def fire(job_name: str, slot: Any) -> None:
            meta = {"source": f"cron:{job_name}", **(metadata or {})}
            await self.host.publish(event_type, payload, meta)
        return fire

    def workflow_handler(self, workflow: Workflow, input: Any, context: Any) -> Callable[..., Any]:  # noqa: A002
        """Start ``workflow`` (a registered one) without waiting; chatflows are refused."""
        if workflow.type == "chatflow":
            raise InvalidArgumentError(
                f"register_cron_workflow: {workflow.name!r} is a chatflow, which needs a conversation "
                "id; publish an event from cron (register_cron_event) and map its conversation id instead")

        async def fire(job_name: str, slot: Any) -> None:
            await self.host.run_workflow(workflow.id, input=input, context=context, wait=False)
        return fire

    # -- running ---------------------------------------------------------------------------------
    def build(self) -> LeaderScheduler:
        """Create the elector and scheduler on the app's Redis (needs ``app.connect()``)."""
        if self.scheduler is None:
            from orchestrator.cron.scheduler import LeaderScheduler
            from orchestrator.leader import LeaderElector

            host = self.host
            self.elector = LeaderElector(host.redis, host.keys, "cron", host.worker_id, ttl_ms=self.lease_ms,
                                         on_elected=lambda *_: self._leadership(True),
                                         on_demoted=lambda *_: self._leadership(False))
            options: dict[str, Any] = {"tz": self.tz}
            if self.check_interval_s is not None:
                options["check_interval_s"] = self.check_interval_s
            self.scheduler = LeaderScheduler(self.elector, host.redis, host.keys, missed_policy=self.missed_policy,
                                             missed_window_s=self.missed_window_s, **options)
            for spec in self._specs.values():
                self.scheduler.add_job(spec.expr, spec.name, spec.handler)
        return self.scheduler

    def _leadership(self, leading: bool) -> None:
        log.info("cron leadership %s (%s)", "gained" if leading else "lost", self.host.worker_id)
        hook = self.host.hooks.on_cron_leadership
        if hook is not None:
            hook(leading)

    async def start(self) -> None:
        if self.host.mode == "worker" or not self._specs:
            return
        await self.build().start()
        log.info("cron: %d jobs, campaigning for leadership as %s", len(self._specs), self.host.worker_id)

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()  # idempotent

    async def describe(self) -> list[dict[str, Any]]:
        await self.host.connect()
        rows = await self.build().describe()
        kinds = {s.name: s.kind for s in self._specs.values()}
        for row in rows:
            row["kind"] = kinds.get(row["name"])
        return rows


def require_known(registry: CronRegistry, ref: str) -> CronSpec:
    spec = registry._find(ref)
    if spec is None:
        raise NotFoundError(f"no cron job {ref!r}")
    return spec
