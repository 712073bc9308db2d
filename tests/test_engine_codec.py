"""The codec's lz4: the C module (engine/_lz4page.c) and python-lz4, which it
stands in for, make and read the same blocks; a space works with either."""

from __future__ import annotations

import errno
import os
import random
import threading

import lz4
import lz4.block
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vswapfs import _build
from vswapfs.engine import PAGE, SwapSpace
from vswapfs.engine import _codec as C

NATIVE = C.Lz4()
PYTHON = C.Lz4(native=False)


def test_the_c_lz4_is_built_with_the_compiled_modules() -> None:
    """Where the request path is compiled (the test script installs gcc and
    the headers; liblz4.so.1 is on every systemd machine), so is the codec's
    lz4, and the codec uses it."""
    if os.environ.get("VSWAPFS_PURE") == "1":
        assert not _build.native_lz4() and not NATIVE.native
        return
    assert _build.native_lz4() and NATIVE.native and not PYTHON.native
    assert C._lz4() is C._lz4() and C._lz4().native


pages = st.one_of(
    st.integers(0, 2**32).map(lambda seed: random.Random(seed).randbytes(PAGE)),  # lz4 gains nothing
    st.builds(lambda unit, n: (unit * (PAGE // max(1, len(unit)) + 1))[:PAGE],
              st.binary(min_size=1, max_size=300), st.integers(0, 10)),  # repeats
    st.lists(st.sampled_from([b"swap ", b"page ", b"slot ", b"\0" * 7, b"zstd ", b"%d"]), min_size=1,
             max_size=200).map(lambda words: (b"".join(words) * PAGE)[:PAGE]),  # text
)


@settings(max_examples=300, deadline=None)
@given(page=pages, mark=st.booleans())
def test_either_lz4_reads_the_blocks_of_the_other(page: bytes, mark: bool) -> None:
    """The blocks are independent and python-lz4's format: each maker's
    block decodes with the other, marked or not, from bytes or a memoryview."""
    for make in (NATIVE, PYTHON):
        blob = make.compress(page, mark)
        assert blob[:1] == C.LZ4_MARK or not mark
        skip = int(mark)
        assert lz4.block.decompress(blob[skip:], uncompressed_size=PAGE) == page
        for read in (NATIVE, PYTHON):
            assert read.decompress(blob, skip, PAGE) == page
            assert read.decompress(memoryview(bytearray(blob)), skip, PAGE) == page
    if not NATIVE.native:
        return
    from vswapfs.engine._lz4page import LIBRARY_VERSION
    if lz4.library_version_number() != LIBRARY_VERSION:
        return
    # the same lz4 version: the same algorithm, so the same bytes (the C module
    # resets its state as python-lz4 does: no history from the last page leaks in)
    assert NATIVE.compress(page, mark) == PYTHON.compress(page, mark)


def test_a_block_that_does_not_decode_to_a_page_is_a_value_error() -> None:
    page = (b"0123456789abcdef" * 300)[:PAGE]
    for lz in (NATIVE, PYTHON):
        blob = lz.compress(page, False)
        for bad, size in [(blob[:-3], PAGE), (b"\xff" * 64, PAGE), (blob, PAGE - 1), (blob, PAGE + 1),
                          (b"", PAGE)]:
            with pytest.raises(ValueError):
                lz.decompress(bad, 0, size)
    for bad_call in (lambda: NATIVE.decompress(blob, len(blob) + 1, PAGE),
                     lambda: NATIVE.decompress(blob, -1, PAGE),
                     lambda: NATIVE.compress(bytes(PAGE + 1), False)):
        with pytest.raises(ValueError):
            bad_call()
    with pytest.raises(TypeError):
        NATIVE.compress("a page", False)  # type: ignore[arg-type]
    if NATIVE.native:  # (python-lz4's stand-in says it its own way)
        with pytest.raises(TypeError, match=r"decompress\(blob, skip, size\) takes 3 arguments, not 2"):
            NATIVE.decompress(blob, 0)  # type: ignore[call-arg]


def test_threads_compressing_at_once_each_get_their_own_pages_back() -> None:
    """The C module keeps its lz4 state on the calling thread's stack and
    releases the GIL while lz4 runs: threads compressing at once must not
    see each other's pages."""
    def page(t: int, i: int) -> bytes:
        return (b"thread %d page %d " % (t, i) * 300)[:PAGE]

    bad: list[tuple[int, int]] = []

    def work(t: int) -> None:
        for i in range(400):
            blob = NATIVE.compress(page(t, i), bool(i % 2))
            if PYTHON.decompress(blob, i % 2, PAGE) != page(t, i):
                bad.append((t, i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert bad == []


def _use(space: SwapSpace, lz: C.Lz4) -> None:
    """Make ``space``'s codec use ``lz`` for lz4 from now on."""
    codec = space._codec
    if codec.name == "lz4":
        codec._lz4 = lz
    else:
        codec._first_lz4 = codec._lz4_decoder = lz


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_a_space_reads_and_recompresses_what_either_lz4_stored(codec: str) -> None:
    """The pool's objects do not say which lz4 made them: a daemon built
    without the C module (python-lz4 then) and one with it store the same
    objects, read each other's, recompress them, and a corrupt one is EIO."""
    data = b"".join((b"page %d of the space " % i * 200)[:PAGE] for i in range(32))
    for first, then in ((NATIVE, PYTHON), (PYTHON, NATIVE)):
        space = SwapSpace(4 * 1024 * 1024, codec=codec)  # zstd: stored first with lz4, marked
        _use(space, first)
        space.write(0, data)
        _use(space, then)
        assert space.read(0, len(data)) == data
        if codec == "zstd":
            while space.recompress():
                pass
            assert space.stats()["recompressed_pages"] == 32 and space.read(0, len(data)) == data
        assert space.check() == []
    bad = C.Codec("lz4")
    blob = bytearray(NATIVE.compress(data[:PAGE], False))
    blob[-8:] = b"\xff" * 8
    for lz in (NATIVE, PYTHON):
        bad._lz4 = lz
        with pytest.raises(OSError) as err:
            bad.decode(bytes(blob))
        assert err.value.errno == errno.EIO


same_filled = st.one_of(
    st.integers(0, 2**64 - 1),  # any value: those no table word holds are compressed instead
    st.integers(0, 255).map(lambda b: int.from_bytes(bytes([b]) * 8, "little")),  # memset pages
).map(lambda v: v.to_bytes(8, "little") * (PAGE // 8))


@settings(max_examples=150, deadline=None)
@given(batch=st.lists(st.one_of(pages, same_filled, st.just(bytes(PAGE))), min_size=1, max_size=8),
       threshold=st.sampled_from([C.DEFAULT_HUGE_THRESHOLD, 64, PAGE]),
       first_lz4=st.booleans())
def test_encode_pages_encodes_each_page_as_encode_does(batch: list[bytes], threshold: int,
                                                       first_lz4: bool) -> None:
    """A write's pages in one C call make what encoding them one by one
    makes: the same SAME words, blocks and poor pages, with the lz4 codec
    (no mark) and a zstd space's lz4 first store (marked)."""
    codec = C.Codec("zstd", first_algorithm="lz4") if first_lz4 else C.Codec("lz4")
    codec.huge_threshold = threshold
    got = codec.encode_pages(memoryview(b"".join(batch)))
    if not NATIVE.native:
        assert got is None
        return
    assert got == [codec.encode(page) for page in batch]


def test_encode_pages_leaves_zstd_levels_and_python_lz4_to_the_page_by_page_path() -> None:
    data = memoryview(b"zstd " * (2 * PAGE // 5) + bytes(2 * PAGE - 5 * (2 * PAGE // 5)))
    assert C.Codec("zstd", first_algorithm="zstd").encode_pages(data) is None
    dense = C.Codec("zstd", first_algorithm="lz4")
    assert dense.encode_pages(data, dense.level) is None  # the pool past half its limit
    slow = C.Codec("lz4")
    slow._lz4 = PYTHON
    assert slow.encode_pages(data) is None
    if NATIVE.native:
        from vswapfs.engine import _lz4page

        with pytest.raises(ValueError, match="whole 4096-byte pages"):
            _lz4page.encode_pages(data[:PAGE + 1], False, PAGE)


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(st.one_of(pages, same_filled, st.just(bytes(PAGE))), min_size=1, max_size=8),
       codec_name=st.sampled_from(["lz4", "zstd"]), recompressed=st.booleans())
def test_a_read_gathered_in_c_is_the_pages_joined(batch: list[bytes], codec_name: str,
                                                  recompressed: bool) -> None:
    """A READ's pages decoded straight into one object are what decoding
    them one by one and joining them makes: lz4 blocks (marked or not), raw
    pages, zstd frames (recompressed), same-filled and zero pages."""
    space = SwapSpace(1024 * 1024, codec=codec_name)
    assert (space._codec.gather([bytes(PAGE)], []) is not None) == NATIVE.native  # the C path is taken
    data = b"".join(batch)
    space.write(PAGE, data)  # not at 0: the read covers a never-written page too
    while recompressed and space.recompress():
        pass
    want = bytes(PAGE) + data
    assert space.read(0, len(want)) == want
    assert [space.read(i * PAGE, PAGE) for i in range(len(batch) + 1)] == [
        want[i * PAGE:(i + 1) * PAGE] for i in range(len(batch) + 1)]
    assert space.read(PAGE + 100, len(data) - 200) == data[100:-100]


def test_gather_refuses_parts_that_are_no_page() -> None:
    if not NATIVE.native:
        assert NATIVE.gather is None
        return
    from vswapfs.engine import _lz4page

    page = (b"0123456789abcdef" * 300)[:PAGE]
    blob = NATIVE.compress(page, True)
    assert _lz4page.gather([page, blob, bytes(PAGE)], 1) == page + page + bytes(PAGE)
    assert _lz4page.gather([], 0) == b""
    for parts, skip in [([blob[:-3]], 1), ([b"\xff" * 64], 0), ([blob], 0), ([b"\0"], 1), ([page] * 257, 0)]:
        with pytest.raises(ValueError):
            _lz4page.gather(parts, skip)
    for parts in ([bytearray(page)], (page,)):
        with pytest.raises(TypeError):
            _lz4page.gather(parts, 0)  # type: ignore[arg-type]
