"""The Orchestrator's workflow, chatflow and cron methods (a mixin, to keep ``app.py`` small).

Everything here delegates: registration and runs to :class:`orchestrator.runs.registry.WorkflowRegistry`,
chatflows to :class:`orchestrator.chat.chatflow.ChatflowExecutor`, cron to
:class:`orchestrator.cron.jobs.CronRegistry`.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.errors import StateError
from orchestrator.events import Event
from orchestrator.topics import encode_topic_frame

if TYPE_CHECKING:
    from orchestrator.workflow.model import Workflow
    from orchestrator.workflow.result import WorkflowRunResult


class _RunServices:
    """``services`` of one run: ``artifacts`` is built only if a node touches it."""

    __slots__ = ("_app", "_run_id", "_artifacts", "publish_topic")

    def __init__(self, app: Any, run_id: str) -> None:
        self._app, self._run_id, self._artifacts = app, run_id, None
        self.publish_topic = app.publish_topic

    @property
    def artifacts(self) -> Any:
        if self._artifacts is None:
            self._artifacts = self._app.artifact_store().scoped(self._run_id)
        return self._artifacts


class WorkflowsAndCronMixin:
    """Mixed into :class:`orchestrator.app.Orchestrator`."""

    # -- workflows --------------------------------------------------------------------------
    def register_workflow(self, workflow: Any, trigger: Any = None, **options: Any) -> Workflow:
        """Register a Workflow (or pyoco-style Flow) with a trigger: ``None`` / ``{"type": "manual"}``
        or ``{"type": "event", "event_type": str | list | re.Pattern | "*", "filter": fn,
        "map_input": fn, "map_context": fn, "map_conversation_id": fn}``. Options: input,
        context, conversation_id, concurrency, fail_fast, timeout, memory. Returns the workflow
        (its ``id`` is derived from its name, so every host agrees)."""
        return self.workflows.register(workflow, trigger, **options)

    def unregister_workflow(self, workflow_id_or_name: str) -> bool:
        return self.workflows.unregister(workflow_id_or_name)

    async def run_workflow(self, workflow: str, input: Any = None, context: Any = None, *,  # noqa: A002
                           wait: bool = True, timeout: float | None = None,
                           conversation_id: str | None = None, local: bool | None = None
                           ) -> WorkflowRunResult | str:
        """Run a registered workflow and (with ``wait``) return its WorkflowRunResult.

        A producer, or an app whose consumer is running, sends a run request through the
        stream and a worker runs it; an app in ``all``/``worker`` mode that is not consuming
        runs it here (``local=True`` forces that). ``wait=False`` returns the run id."""
        reg = self.workflows.get(workflow)
        if local is None:
            local = self.mode != "producer" and self._consume_task is None
        if not local:
            await self.connect()
            return await self.workflows.request(reg.workflow.id, input=input, context=context,
                                                conversation_id=conversation_id, wait=wait, timeout=timeout)
        await self.connect()
        coro = self.workflows.execute(reg, event=None, run_id=str(uuid.uuid4()), input=input,
                                      context=context, conversation_id=conversation_id)
        return await asyncio.wait_for(coro, timeout)

    def services_for(self, run_id: str) -> Any:
        """What a run's nodes get as ``services``: a per-run artifact folder (created on first
        use), publish_topic."""
        return _RunServices(self, run_id)

    def artifact_store(self) -> Any:
        """The app's artifact store (a FileArtifactStore under ``artifacts_dir`` or
        ``{state_dir}/artifacts``), built once."""
        if self._artifact_store is None:
            from orchestrator.workflow.artifacts import FileArtifactStore

            self._artifact_store = FileArtifactStore(self._artifacts_dir or (self.settings.state_dir / "artifacts"))
        return self._artifact_store

    def chatflows(self) -> Any:
        """The conversation executor (locks, order, fenced memory) on this app's Redis
        (a :class:`orchestrator.chat.chatflow.ChatflowExecutor`)."""
        if self._chatflows is None:
            from orchestrator.chat.chatflow import ChatflowExecutor

            if self.redis is None:
                raise StateError("chatflows need a Redis connection: call connect() or start() first")
            self._chatflows = ChatflowExecutor(self.redis, self.keys, self.conversation_store, self.runner,
                                               lock_ttl_ms=self.conversation_lock_ttl_ms)
        return self._chatflows

    async def publish_topic(self, topic: str, message: Any) -> int:
        """Publish a Miclow topic message (``tokiwa:topic:{topic}``) that relay tasks on any
        host subscribed to ``topic`` receive as ``topic:message``."""
        await self.connect()
        frame = encode_topic_frame(f"app-{self.worker_id}", socket.gethostname(), "app", str(message))
        return await self.redis.publish(self.keys.topic(topic), frame)

    # -- cron -------------------------------------------------------------------------------
    def register_cron_job(self, expr: str, name: str, handler: Callable[..., Any]) -> str:
        """Run ``handler(job_name, slot)`` on every slot of ``expr`` (5 fields, or 6 with a
        leading seconds field), on the leader producer only; returns the job id."""
        return self.cron.add(expr, name, handler, "job")

    def register_cron_event(self, expr: str, event_type: str, name: str, payload: Any = None,
                            metadata: Mapping[str, Any] | None = None) -> str:
        """Publish ``event_type`` on every slot of ``expr``."""
        Event(event_type)  # a blank type fails now, not at 3 a.m.
        return self.cron.add(expr, name, self.cron.event_handler(event_type, payload, dict(metadata or {})),
                             "event")

    def register_cron_workflow(self, expr: str, workflow_id: str, name: str, input: Any = None,  # noqa: A002
                               context: Any = None) -> str:
        """Start a registered workflow on every slot of ``expr`` (chatflows are refused: they
        need a conversation id)."""
        return self.cron.add(expr, name, self.cron.workflow_handler(workflow_id, input, context), "workflow")

    def remove_cron_job(self, job_id_or_name: str) -> bool:
        return self.cron.remove(job_id_or_name)

    def is_cron_job_scheduled(self, job_id_or_name: str) -> bool:
        return self.cron.is_scheduled(job_id_or_name)

