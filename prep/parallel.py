"""Thread-pool maps that keep a bounded number of tasks in flight.

`Executor.map` submits every item at once: over a million files that is a million futures (and
their results) held in memory before the first is consumed - gigabytes. `bounded_map` keeps at
most `window` tasks submitted, in input order, so memory stays flat in the number of items.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(pool: Executor, fn: Callable[[T], R], items: Iterable[T], window: int | None = None) -> Iterator[R]:
    """`pool.map(fn, items)` in input order, with at most `window` tasks in flight (default 4 per worker)."""
    size = window or 4 * max(1, getattr(pool, "_max_workers", 8))
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= size:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
