"""Fixtures of the relay tests: a tap on the namespace's topics, and the relays a test
started (stopped after it, within 10 s, printing every task's stack when one hangs)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.relay_helpers import Tap


@pytest.fixture
async def tap(redis_url: str, namespace: str):
    async with Tap(redis_url, namespace) as t:
        yield t


@pytest.fixture
async def relays():
    started: list[Any] = []
    yield started
    for relay in started:
        try:
            await asyncio.wait_for(relay.stop(), 10)
        except TimeoutError:
            for task in asyncio.all_tasks():
                task.print_stack()
            raise
