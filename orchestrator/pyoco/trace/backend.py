"""``TraceBackend``: where the engine reports a run's events (subclass it for your own sink)."""

from __future__ import annotations

from abc import ABC, abstractmethod


class TraceBackend(ABC):
    """The engine calls these from the run's event-loop thread, never from a task's thread."""

    @abstractmethod
    def on_flow_start(self, flow_name: str, run_id: str | None = None) -> None:
        """The run started."""

    @abstractmethod
    def on_flow_end(self, flow_name: str) -> None:
        """The run completed (or was cancelled); not called when ``Engine.run`` raises."""

    @abstractmethod
    def on_node_start(self, node_name: str) -> None:
        """A task started (once, however many attempts it takes)."""

    @abstractmethod
    def on_node_end(self, node_name: str, duration_ms: float) -> None:
        """A task succeeded; ``duration_ms`` includes its retries."""

    @abstractmethod
    def on_node_error(self, node_name: str, error: BaseException) -> None:
        """A task failed for good (after its retries)."""

    def on_node_transition(self, source: str, target: str) -> None:  # noqa: B027 - optional hook
        """Optional: a transition from one task to the next."""
