"""The in-process Queue (tokiwa's): FIFO order, peek, size, list, drain, clear, threads."""

from __future__ import annotations

import threading

import pytest

from orchestrator import Event, Queue
from orchestrator.errors import InvalidArgumentError


def events(n: int) -> list[Event]:
    return [Event("order.created", {"i": i}) for i in range(n)]


def test_events_come_out_in_the_order_they_went_in():
    queue = Queue()
    batch = events(3)
    for event in batch:
        queue.enqueue(event)
    assert queue.size() == 3 == len(queue)
    assert [queue.dequeue() for _ in range(3)] == batch
    assert queue.dequeue() is None and queue.size() == 0


def test_peek_and_list_leave_the_queue_as_it_was():
    batch = events(2)
    queue = Queue(batch)
    assert queue.peek() is batch[0] and queue.list() == batch and list(queue) == batch
    assert queue.size() == 2
    assert Queue().peek() is None and Queue().list() == []


def test_drain_takes_every_waiting_event_and_empties_the_queue():
    batch = events(5)
    queue = Queue(batch)
    queue.dequeue()
    assert queue.drain() == batch[1:]
    assert queue.size() == 0 and queue.drain() == []


def test_clear_drops_every_waiting_event():
    queue = Queue(events(4))
    queue.clear()
    assert queue.size() == 0 and queue.dequeue() is None


@pytest.mark.parametrize("bad", [None, {"type": "x"}, "order.created"])
def test_only_events_can_be_enqueued(bad):
    with pytest.raises(InvalidArgumentError, match="Queue.enqueue expects an Event"):
        Queue().enqueue(bad)


def test_threads_enqueueing_and_dequeueing_lose_and_duplicate_nothing():
    queue = Queue()
    taken: list[Event] = []
    lock = threading.Lock()
    made = [events(500) for _ in range(4)]

    def produce(batch: list[Event]) -> None:
        for event in batch:
            queue.enqueue(event)

    def consume() -> None:
        while True:
            event = queue.dequeue()
            if event is None:
                if not any(t.is_alive() for t in producers):
                    rest = queue.drain()
                    with lock:
                        taken.extend(rest)
                    return
                continue
            with lock:
                taken.append(event)

    producers = [threading.Thread(target=produce, args=(b,)) for b in made]
    consumers = [threading.Thread(target=consume) for _ in range(3)]
    for t in producers + consumers:
        t.start()
    for t in producers + consumers:
        t.join(10)
    assert sorted(e.id for e in taken) == sorted(e.id for b in made for e in b)
