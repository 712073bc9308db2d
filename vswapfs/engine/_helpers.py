"""Helper threads that compress a share of a large write.

Swap-out reaches the engine as writes of up to 128 pages, and on cgroup v1
the task whose reclaim sent them waits until they are stored: compressing
them is on that task's critical path, while the CPU it would run on sits
idle.  zstd releases the GIL while it works and the Python between two
calls is short, so cutting a batch into parts and compressing them on
several threads at once runs it on several CPUs with little contention.

The threads are started up front (a reserve-mode daemon starts no thread
after its mount) and hold no reference to the engine: each job carries the
function to apply, and the threads stop when their owner is collected or
closed.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MIN_PART: Final = 16  # items per part: handing a part over costs about as much as compressing a few pages
_STOP: Final = None


def default_threads() -> int:
    """Helpers worth having on this machine: one per CPU beyond the first,
    at most three (a swap-out batch is 128 pages at most)."""
    return max(0, min(3, (os.cpu_count() or 1) - 1))


def _work(jobs: queue.SimpleQueue[Any]) -> None:
    """A helper: apply each job's function to its items, post the results."""
    while (job := jobs.get()) is not _STOP:
        fn, items, out, part = job
        try:
            out.put((part, [fn(x) for x in items]))
        except BaseException as e:  # handed to the caller, who raises it
            out.put((part, e))


class Helpers:
    """``threads`` helper threads and a ``map`` that shares a batch with them."""

    def __init__(self, threads: int, name: str = "vswapfs-compress") -> None:
        if threads < 0:
            raise ValueError(f"helper threads must be >= 0, not {threads}")
        self.threads = threads
        self.shared_items = 0  # items mapped on helper threads rather than the caller's
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pool = [threading.Thread(target=_work, args=(self._jobs,), name=f"{name}-{i}",
                                       daemon=True) for i in range(threads)]
        for t in self._pool:
            t.start()
        self._stop = weakref.finalize(self, _stop, self._jobs, len(self._pool))

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(x) for x in items]``, in parts on the helpers and this
        thread when the batch is large enough; the first exception raised
        by ``fn`` is raised here, once every part has finished."""
        n = len(items)
        parts = min(self.threads + 1, n // MIN_PART)
        if parts < 2:
            return [fn(x) for x in items]
        step = -(-n // parts)
        out: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        for part in range(parts - 1):  # the helpers take the first parts
            self._jobs.put((fn, items[part * step:(part + 1) * step], out, part))
        mine: list[R] | BaseException
        try:
            mine = [fn(x) for x in items[(parts - 1) * step:]]
        except BaseException as e:
            mine = e
        done = dict(out.get() for _ in range(parts - 1))
        done[parts - 1] = mine
        result: list[R] = []
        for part in range(parts):
            got = done[part]
            if isinstance(got, BaseException):
                raise got
            result += got
        self.shared_items += (parts - 1) * step
        return result

    def close(self) -> None:
        """Stop the threads and wait for them."""
        self._stop()
        for t in self._pool:
            t.join()


def _stop(jobs: queue.SimpleQueue[Any], threads: int) -> None:
    for _ in range(threads):
        jobs.put(_STOP)
