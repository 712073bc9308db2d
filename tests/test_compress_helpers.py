"""Helper threads that compress a share of large writes (engine._helpers)."""

from __future__ import annotations

import gc
import os
import threading

import pytest

from vswapfs.engine import PAGE, SwapSpace
from vswapfs.engine._helpers import MIN_PART, Helpers


def _helper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vswapfs-compress")]


def test_map_shares_a_large_batch_and_keeps_the_order() -> None:
    h = Helpers(1)
    try:
        seen: set[str] = set()

        def square(x: int) -> int:
            seen.add(threading.current_thread().name)
            return x * x

        items = list(range(4 * MIN_PART + 3))
        assert h.map(square, items) == [x * x for x in items]
        assert h.shared_items > 0
        assert len(seen) == 2  # the caller and the helper both worked
    finally:
        h.close()


def test_map_keeps_a_small_batch_on_the_calling_thread() -> None:
    h = Helpers(2)
    try:
        names = h.map(lambda _: threading.current_thread().name, range(2 * MIN_PART - 1))
        assert set(names) == {threading.current_thread().name}
        assert h.shared_items == 0
    finally:
        h.close()


@pytest.mark.parametrize("bad", [0, 4 * MIN_PART - 1], ids=["in-a-helpers-part", "in-the-callers-part"])
def test_map_raises_what_the_function_raised(bad: int) -> None:
    h = Helpers(1)
    try:
        def f(x: int) -> int:
            if x == bad:
                raise ValueError(f"item {x}")
            return x

        with pytest.raises(ValueError, match=f"item {bad}"):
            h.map(f, list(range(4 * MIN_PART)))
        assert h.map(f, [1, 2]) == [1, 2]  # the helpers are still there
        good = list(range(100, 100 + 4 * MIN_PART))
        assert h.map(f, good) == good
    finally:
        h.close()


def test_negative_thread_count_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Helpers(-1)


def test_close_and_collection_stop_the_threads() -> None:
    before = len(_helper_threads())
    h = Helpers(2)
    assert len(_helper_threads()) == before + 2
    h.close()
    assert len(_helper_threads()) == before
    h2 = Helpers(2)
    threads = _helper_threads()[before:]
    del h2
    gc.collect()
    for t in threads:
        t.join(5)
        assert not t.is_alive()


def test_space_with_helpers_stores_what_a_serial_space_stores() -> None:
    """Text, random, zero and same-filled pages in 128-page writes: the same
    pages read back, the same table words and payload as without helpers."""
    pages = []
    for i in range(512):
        kind = i % 4
        if kind == 0:
            pages.append((b"helper page %06d reads like text. " % i * 200)[:PAGE])
        elif kind == 1:
            pages.append(os.urandom(PAGE))
        elif kind == 2:
            pages.append(bytes(PAGE))
        else:
            pages.append(bytes([i % 251]) * PAGE)
    data = b"".join(pages)
    serial, shared = SwapSpace(8 << 20), SwapSpace(8 << 20, compress_threads=1)
    try:
        for s in (serial, shared):
            for off in range(0, len(data), 128 * PAGE):
                s.write(off, data[off:off + 128 * PAGE])
        for i, page in enumerate(pages):
            assert shared.read(i * PAGE, PAGE) == page, f"page {i}"
        a, b = serial.stats(), shared.stats()
        assert b["helper_pages"] > 0 and a["helper_pages"] == 0
        for k in ("stored_pages", "zero_pages", "pool_pages", "huge_pages", "compr_data_size"):
            assert a[k] == b[k], k
    finally:
        serial.close()
        shared.close()
    assert not [t for t in _helper_threads() if t.is_alive()]
