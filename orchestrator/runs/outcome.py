"""What one processing step came to for one event: a :class:`Verdict` and the error text.

A step is the dispatcher (the subscribers) or a processor added with
``Orchestrator.add_processor`` (the workflow triggers are one). ``Orchestrator.process_event``
combines the steps' results into the consumer's ``Outcome``: ok (ack), failed (``ack_policy``
decides) or retry (redelivered whatever ``ack_policy`` says).
"""

from __future__ import annotations

import traceback as tb
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    """How a step ended for one event, from the mildest to the most pressing."""

    #: done: the event may be acked
    OK = "ok"
    #: the event's own failure (a node raised, a workflow is misconfigured): under
    #: ``ack_policy="always"`` it is acked as failed, under ``"on_success"`` redelivered
    FAILED = "failed"
    #: the event did not fail, the infrastructure did (a conversation lock not had in time,
    #: Redis failing under the run): redelivered whatever ``ack_policy`` says
    RETRY_LATER = "retry_later"
    #: a chatflow whose conversation lock has a newer holder (its memory write was refused, or
    #: the lock was lost during the run): redelivered, keeping its conversation turn
    FENCED_OUT = "fenced_out"

    @property
    def redo(self) -> bool:
        """Whether the event is to be redelivered whatever ``ack_policy`` says."""
        return self in (Verdict.RETRY_LATER, Verdict.FENCED_OUT)


_RANK = {verdict: n for n, verdict in enumerate(Verdict)}


@dataclass(frozen=True, slots=True)
class ProcessResult:
    """One step's result: its verdict, what went wrong (empty when OK) and, when an
    exception caused it, that exception's traceback."""

    verdict: Verdict = Verdict.OK
    error: str = ""
    traceback: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK

    @classmethod
    def of_exception(cls, verdict: Verdict, what: str, exc: BaseException) -> ProcessResult:
        """``what`` failed with ``exc``: the error reads ``what: ExcType: message``."""
        return cls(verdict, f"{what}: {type(exc).__name__}: {exc}", "".join(tb.format_exception(exc)))

    @classmethod
    def combine(cls, results: Iterable[ProcessResult]) -> ProcessResult:
        """One result for several steps (or runs): the most pressing verdict, the errors
        joined by ``"; "`` in order."""
        failed = [r for r in results if not r.ok]
        if not failed:
            return OK
        if len(failed) == 1:
            return failed[0]
        verdict = max((r.verdict for r in failed), key=_RANK.__getitem__)
        return cls(verdict, "; ".join(r.error for r in failed),
                   "\n".join(r.traceback for r in failed if r.traceback))


#: the result of a step that found nothing wrong
OK = ProcessResult()
