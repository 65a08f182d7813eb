"""``BaseTask``: an abstract class for tasks written as classes (implement ``run(ctx)``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class BaseTask(ABC):
    """Subclass and implement :meth:`run`; register ``MyTask().run`` with ``@task`` or as a
    ``callable`` in a config, like any function."""

    @abstractmethod
    def run(self, ctx: Any) -> Any:
        """Do the work with the run's :class:`~orchestrator.pyoco.core.context.Context`."""
        raise NotImplementedError
