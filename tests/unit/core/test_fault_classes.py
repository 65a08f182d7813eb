"""The fault model's classes (docs/faults.md's table), without Redis."""

from __future__ import annotations

import ssl

import pytest
from redis import exceptions as rx

from orchestrator.faults import Fault, classify


def wrapped(cause: BaseException) -> rx.ConnectionError:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise rx.ConnectionError("Error 1 connecting to 127.0.0.1:6380.") from inner
    except rx.ConnectionError as outer:
        return outer


@pytest.mark.parametrize(("exc", "fault"), [
    (rx.ConnectionError("Connection refused"), Fault.CONNECTION),
    (rx.TimeoutError("Timeout reading"), Fault.CONNECTION),
    (OSError("unreachable"), Fault.CONNECTION),
    (rx.BusyLoadingError("LOADING"), Fault.CONNECTION),
    (rx.AuthenticationError("invalid password"), Fault.FATAL),
    (rx.ReadOnlyError("READONLY"), Fault.FAILOVER),
    (rx.OutOfMemoryError("OOM command not allowed"), Fault.OOM),
    (rx.ResponseError("NOGROUP No such key"), Fault.NOGROUP),
    (rx.ResponseError("NOPERM this user has no permissions"), Fault.FATAL),
    (rx.ResponseError("BUSY Redis is busy running a script"), Fault.BUSY),
    (ValueError("a bug"), Fault.FATAL),
])
def test_each_error_has_its_class(exc, fault):
    assert classify(exc) is fault


def test_a_certificate_that_fails_verification_is_fatal_not_a_link_to_wait_for():
    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert classify(wrapped(verify)) is Fault.FATAL
    assert classify(rx.ConnectionError("Error 1 connecting: [SSL: CERTIFICATE_VERIFY_FAILED] self-signed")) is Fault.FATAL
    assert classify(wrapped(ConnectionRefusedError(111, "refused"))) is Fault.CONNECTION


def test_a_connection_closed_under_redis_py_is_a_lost_link_and_other_attribute_errors_are_bugs():
    # what redis-py's connection code raises when its writer went away mid-command (the
    # frame's file is redis-py's own)
    code = compile("writer = None\nwriter.writelines([b'PING'])", "/site-packages/redis/asyncio/connection.py", "exec")
    with pytest.raises(AttributeError) as inside:
        exec(code, {})
    assert classify(inside.value) is Fault.CONNECTION
    with pytest.raises(AttributeError) as mine:
        exec(compile("writer = None\nwriter.writelines([b'PING'])", "/app/handlers.py", "exec"), {})
    assert classify(mine.value) is Fault.FATAL
