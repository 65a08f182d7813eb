"""RetryPolicy: validation, backoff curves and jitter with an injected random source."""

from __future__ import annotations

import random

import pytest

from orchestrator.errors import InvalidArgumentError, StepExecutionError, WorkflowAborted
from orchestrator.workflow.retry import RetryPolicy


class FixedRng:
    """A random source whose uniform(a, b) always returns the given fraction of the range."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


def test_defaults_mean_a_single_attempt():
    policy = RetryPolicy()
    assert policy.max_attempts == 1
    assert not policy.should_retry(ValueError("x"), 1)


def test_exponential_backoff_doubles_from_the_initial_delay_up_to_the_cap():
    policy = RetryPolicy(max_attempts=10, backoff="exponential", initial_delay_s=1, multiplier=2, max_delay_s=10)
    assert [policy.delay_for(k) for k in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_fixed_backoff_always_waits_the_initial_delay():
    policy = RetryPolicy(max_attempts=5, backoff="fixed", initial_delay_s=0.5)
    assert [policy.delay_for(k) for k in range(1, 5)] == [0.5, 0.5, 0.5, 0.5]


def test_linear_backoff_adds_the_increment_each_attempt():
    policy = RetryPolicy(max_attempts=5, backoff="linear", initial_delay_s=1, increment_s=2, max_delay_s=6)
    assert [policy.delay_for(k) for k in range(1, 6)] == [1, 3, 5, 6, 6]


def test_linear_increment_defaults_to_the_initial_delay():
    assert RetryPolicy(backoff="linear", initial_delay_s=3).delay_for(3) == 9


def test_huge_attempt_numbers_stay_at_the_cap():
    assert RetryPolicy(max_attempts=5000, max_delay_s=30).delay_for(4000) == 30


def test_full_jitter_draws_between_zero_and_the_delay():
    policy = RetryPolicy(max_attempts=3, initial_delay_s=4, jitter="full")
    assert policy.delay_for(1, FixedRng(0.0)) == 0
    assert policy.delay_for(1, FixedRng(0.25)) == 1
    assert policy.delay_for(2, FixedRng(1.0)) == 8


def test_equal_jitter_keeps_at_least_half_the_delay():
    policy = RetryPolicy(max_attempts=3, initial_delay_s=4, jitter="equal")
    assert policy.delay_for(1, FixedRng(0.0)) == 2
    assert policy.delay_for(1, FixedRng(1.0)) == 4


def test_jitter_never_exceeds_the_cap():
    policy = RetryPolicy(max_attempts=9, initial_delay_s=10, max_delay_s=12, jitter="full")
    rng = random.Random(7)
    assert all(0 <= policy.delay_for(k, rng) <= 12 for k in range(1, 9) for _ in range(20))


def test_only_listed_exception_types_are_retried():
    policy = RetryPolicy(max_attempts=3, retry_on=(ConnectionError,))
    assert policy.should_retry(ConnectionResetError("reset"), 1)
    assert not policy.should_retry(ValueError("bad"), 1)
    assert not policy.should_retry(ConnectionError("x"), 3)  # no attempts left


def test_retry_on_accepts_class_names_for_declarative_files():
    policy = RetryPolicy(max_attempts=3, retry_on=("ConnectionError", "StepExecutionError"))
    assert policy.should_retry(ConnectionResetError(), 1)  # a subclass matches by its MRO
    assert policy.should_retry(StepExecutionError("boom"), 1)
    assert not policy.should_retry(KeyError("k"), 1)


def test_workflow_aborted_is_never_retried():
    policy = RetryPolicy(max_attempts=5, retry_on=(Exception, WorkflowAborted))
    assert not policy.should_retry(WorkflowAborted("stop"), 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_attempts": 0}, "max_attempts must be an integer >= 1"),
    ({"max_attempts": 2.5}, "max_attempts"),
    ({"max_attempts": True}, "max_attempts"),
    ({"backoff": "quadratic"}, "backoff must be one of"),
    ({"jitter": "some"}, "jitter must be one of"),
    ({"initial_delay_s": -1}, "initial_delay_s must be >= 0"),
    ({"multiplier": 0.5}, "multiplier must be >= 1"),
    ({"max_delay_s": float("nan")}, "max_delay_s must be a finite number"),
    ({"increment_s": -2}, "increment_s"),
    ({"retry_on": (ValueError, 3)}, "retry_on must hold exception types"),
])
def test_invalid_policies_fail_at_construction(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        RetryPolicy(**kwargs)


def test_delay_for_rejects_attempt_numbers_below_one():
    with pytest.raises(InvalidArgumentError, match="attempt must be an integer >= 1"):
        RetryPolicy().delay_for(0)


def test_a_refused_path_is_never_retried_even_when_every_error_is_retryable():
    from orchestrator.errors import UnsafePathError
    from orchestrator.workflow.retry import RetryPolicy

    policy = RetryPolicy(max_attempts=5, retry_on=(Exception,))
    refused = UnsafePathError("step 'f': path '../x' leads outside", path="../x", resolved="/x", base_dir="/wf")
    assert not policy.should_retry(refused, attempt=1)
    assert policy.should_retry(OSError("disk"), attempt=1)
