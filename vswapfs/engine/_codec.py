"""The codec: what a page becomes before it is stored, and back.

A page is either same-filled (one 8-byte value repeated: it then lives in
its table word, see ``_entry``), or compressed with zstd or lz4, or, when
it compresses worse than ``huge_threshold``, "poor" and kept raw.  The
codec is fixed for a space's life: the pool holds its output.

zstd stores in two steps.  A page being swapped out is compressed with
lz4 (the default ``first_algorithm``: 7.4 µs for a real-file page here
against 11.9 at zstd -1 and 18.6 at level 1, 2,367 bytes against 2,094 and
1,752), or with zstd at ``first_level`` (-1 by default);
:meth:`Codec.recompress` later makes it zstd at ``level`` (1 by default),
in the background, once the daemon is idle (see ``SwapSpace.recompress``).
Any zstd frame decodes the same way whatever level made it, and an lz4
object starts with LZ4_MARK, which no zstd frame does: nothing in the table
records how a page was stored, and a page is worth recompressing if the
result is smaller.  With the zstd first store at ``level`` (or the lz4
codec) there is one step; once the pool is past half its limit,
``SwapSpace.write`` stores at ``level`` at once (density matters more than
speed there).

lz4 is the C module ``_lz4page`` where the build made it (python-lz4's
blocks without its copies, see ``_lz4page.c``), python-lz4 otherwise:
:class:`Lz4` hides which.

No lock: compression runs on the caller's thread, outside the engine lock
(zstandard and lz4 release the GIL).  zstd contexts are shared through a
small free list rather than kept per thread: a thread that compresses once
does not keep a context for good, and the first ones are made (and their
code faulted in) at start, not in the middle of a burst.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Final

import zstandard
from mypy_extensions import mypyc_attr

from .._consts import (
    CODECS,
    DEFAULT_CODEC,
    DEFAULT_FIRST_ALGORITHM,
    DEFAULT_FIRST_LEVEL,
    DEFAULT_LEVEL,
    FIRST_ALGORITHMS,
    PAGE,
    ZSTD_LEVELS,
)
from . import _entry as E
from . import _inject

_ARMED: Final = _inject.armed  # changed in place, never rebound; Final: a C static when compiled

MIN_LEVEL, MAX_LEVEL = ZSTD_LEVELS  # zstd's fast levels (negative) trade ratio for speed
assert MAX_LEVEL == zstandard.MAX_COMPRESSION_LEVEL, "ZSTD_LEVELS is not this zstd's"
DEFAULT_HUGE_THRESHOLD: Final = PAGE * 3 // 4

_ZERO_PAGE: Final = bytes(PAGE)
ZERO_WORD: Final = E.SAME  # the zero page's word: SAME, form 0, value 0 (what same_word(0) gives)
_WARM_PAGE: Final = b"vswapfs warms its zstd contexts up. " * 113 + bytes(28)
# The first byte of an lz4 object in a zstd space (a first store with lz4): a
# zstd frame starts with 0x28 (its magic number), and an lz4 block of a page
# with a token whose literal count is at least 1 (nothing precedes the first
# match), so a 0 byte tells lz4 from zstd without a bit in the table word.
LZ4_MARK: Final = b"\0"


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """A page compressor: no frame checksum, size or dictionary id (the
    table word knows the length).  zstd sizes its window and tables for
    the 4 KiB input by itself (an 86 KB context at level 1)."""
    return zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=False,
                                    write_dict_id=False)


Buffer = bytes | bytearray | memoryview


class Lz4:
    """lz4 blocks of pages, the same from either maker: ``compress(page,
    mark)`` (the block, after LZ4_MARK if ``mark``) and ``decompress(blob,
    skip, size)`` (the ``size`` bytes the block after ``skip`` bytes holds;
    ValueError if it does not decode to exactly that).  The C module's
    functions where the build made it and ``native`` is not False,
    python-lz4's otherwise."""

    def __init__(self, native: bool = True) -> None:
        self.compress: Callable[[Buffer, bool], bytes]
        self.decompress: Callable[[Buffer, int, int], bytes]
        # a write's pages in one call (the C module's only), see Codec.encode_pages
        self.encode_pages: Callable[[Buffer, bool, int], list[int | bytes | None]] | None = None
        # a READ's pages in one bytes object (the C module's only), see Codec.gather
        self.gather: Callable[[list[bytes], int], bytes] | None = None
        self.gather_max = 0  # the most pages gather takes
        self.native = False  # True: the C module's (vswapfs/engine/_lz4page.c)
        if native:
            try:
                from . import _lz4page
            except ImportError:  # not built (no C compiler or no liblz4.so.1 then)
                pass
            else:
                self.compress, self.decompress = _lz4page.compress, _lz4page.decompress
                self.encode_pages, self.gather = _lz4page.encode_pages, _lz4page.gather
                self.gather_max = _lz4page.MAX_PARTS
                self.native = True
                return
        import lz4.block as block  # typed Any: the build's mypy may not see lz4
        compress, decompress, error = block.compress, block.decompress, block.LZ4BlockError

        def py_compress(page: Buffer, mark: bool) -> bytes:
            out: bytes = compress(page, store_size=False)
            return LZ4_MARK + out if mark else out

        def py_decompress(blob: Buffer, skip: int, size: int) -> bytes:
            try:
                out: bytes = decompress(memoryview(blob)[skip:], uncompressed_size=size)
            except error as e:
                raise ValueError(str(e)) from None
            if len(out) != size:
                raise ValueError(f"the lz4 block decodes to {len(out)} bytes, not {size}")
            return out

        self.compress, self.decompress = py_compress, py_decompress


_shared_lz4: Lz4 | None = None  # the Lz4 every codec shares, made at the first that needs it


def _lz4() -> Lz4:
    global _shared_lz4
    if _shared_lz4 is None:
        _shared_lz4 = Lz4()
    return _shared_lz4


def check_level(codec: str, level: int) -> None:
    """Raise ValueError unless ``level`` is a level ``codec`` has."""
    if codec != "zstd":
        raise ValueError(f"levels are zstd's; this space compresses with {codec}")
    if level == 0 or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"level must be a non-zero zstd level in {MIN_LEVEL}..{MAX_LEVEL}, not {level}")


def check_first_algorithm(codec: str, name: str) -> None:
    """Raise ValueError unless a ``codec`` space can store pages first with ``name``."""
    if codec != "zstd":
        raise ValueError(f"the first algorithm is a zstd space's; this one compresses with {codec}")
    if name not in FIRST_ALGORITHMS:
        raise ValueError(f"first algorithm must be one of {', '.join(FIRST_ALGORITHMS)}, not {name!r}")


@mypyc_attr(allow_interpreted_subclasses=True)  # compiled (setup.py); a test hooks a subclass in
class Codec:
    """Encodes pages for the table and the pool, and decodes pool objects.

    The levels (:meth:`set_levels`) and ``huge_threshold`` (a plain
    attribute store) may change at any time; a page in flight uses the
    values it read.
    """

    def __init__(self, name: str = DEFAULT_CODEC, level: int = DEFAULT_LEVEL,
                 huge_threshold: int = DEFAULT_HUGE_THRESHOLD,
                 first_level: int | None = DEFAULT_FIRST_LEVEL,
                 first_algorithm: str = DEFAULT_FIRST_ALGORITHM) -> None:
        if name not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, not {name!r}")
        self.name = name
        self._lz4: Lz4 | None = None  # lz4 when the codec is lz4
        if name == "lz4":  # imported when used (at start, not in a burst: once loaded in
            # a burst, it cost a point of the memory returned after it in the bench)
            self._lz4 = _lz4()
        # lz4 when a zstd space stores pages with lz4 first (set_first_algorithm);
        # _lz4_decoder too once an lz4 object was read (the first store may have changed)
        self._first_lz4: Lz4 | None = None
        self._lz4_decoder: Lz4 | None = None
        self.level = 0  # the level pages end up at (0 with lz4), see set_levels
        self.fast_level: int | None = None  # the first store's level as set (None: ``level``)
        self.first_level = 0  # the first store's level in effect: never denser than ``level``
        self.huge_threshold = huge_threshold
        # idle compressors by level: the first store's and recompression's
        self._cctxs: dict[int, list[zstandard.ZstdCompressor]] = {}
        self._dctxs: list[zstandard.ZstdDecompressor] = []  # idle decompressors
        if name == "zstd":
            self.set_levels(level, first_level)
            self.set_first_algorithm(first_algorithm)

    def warm(self) -> None:
        """Make the first contexts now, not in the first burst."""
        blob = self.encode(_WARM_PAGE)[1]
        if blob is not None:
            self.decode(blob)
            self.recompress(blob)

    def set_levels(self, level: int, fast_level: int | None) -> None:
        """Set the final level and the first store's (None: the final one;
        never denser than it).  A store in flight uses the levels it read;
        contexts of levels no longer used are dropped."""
        self.level, self.fast_level = level, fast_level
        self.first_level = level if fast_level is None or fast_level > level else fast_level
        self._cctxs = {lv: self._cctxs.get(lv, []) for lv in {self.level, self.first_level}}

    def set_first_algorithm(self, name: str) -> None:
        """Store pages first with ``name`` (a zstd space): ``lz4``, or
        ``zstd`` at ``first_level``.  Either is recompressed to ``level``."""
        check_first_algorithm(self.name, name)
        if name == "lz4":
            self._first_lz4 = self._lz4_decoder = _lz4()
        else:
            self._first_lz4 = None

    @property
    def first_algorithm(self) -> str:
        """What a page is stored with first: ``lz4`` or ``zstd`` (the codec's name when it is lz4)."""
        return "lz4" if self._first_lz4 is not None or self._lz4 is not None else "zstd"

    @property
    def two_step(self) -> bool:
        """True if pages are first stored faster than their final form: at a
        faster zstd level, or with lz4."""
        return self.first_level != self.level or self._first_lz4 is not None

    def compress(self, page: bytes, level: int | None = None) -> bytes:
        """The page compressed (may be longer than the page): as the first
        store does (lz4, or zstd at ``first_level``) unless a zstd ``level``
        is asked for."""
        if _ARMED:
            _inject.point("codec.compress")
        if self._lz4 is not None:  # stateless: no context to pool
            return self._lz4.compress(page, False)
        if level is None:
            if self._first_lz4 is not None:
                return self._first_lz4.compress(page, True)
            level = self.first_level
        idle = self._cctxs.get(level)
        if idle is None:
            idle = self._cctxs.setdefault(level, [])  # atomic under the GIL, as pop and append
        try:
            c = idle.pop()
        except IndexError:
            c = _compressor(level)
        try:
            packed: bytes = c.compress(page)  # typed: the build's mypy may not see zstandard
            return packed
        except zstandard.ZstdError as e:  # zstd fails only when it cannot allocate
            raise MemoryError(f"zstd: {e}") from None
        finally:
            idle.append(c)

    def decode(self, blob: bytes) -> bytes:
        """The page a pool object holds.  A corrupt object is an I/O error
        (EIO), as a bad backing page is."""
        if _ARMED:
            _inject.point("codec.decompress")
        if len(blob) == PAGE:
            return blob
        page: bytes
        if self._lz4 is not None:
            try:
                return self._lz4.decompress(blob, 0, PAGE)
            except ValueError as lz4_err:
                raise OSError(errno.EIO, f"pool object does not decompress: {lz4_err}") from None
        elif blob[0] == 0:  # LZ4_MARK: stored first with lz4
            lz = self._lz4_decoder
            if lz is None:
                lz = self._lz4_decoder = _lz4()
            try:
                return lz.decompress(blob, 1, PAGE)
            except ValueError as mark_err:
                raise OSError(errno.EIO, f"pool object does not decompress: {mark_err}") from None
        else:
            try:
                d = self._dctxs.pop()
            except IndexError:
                d = zstandard.ZstdDecompressor()
            try:
                page = d.decompress(blob, max_output_size=PAGE)
            except zstandard.ZstdError as zstd_err:
                raise OSError(errno.EIO, f"pool object does not decompress: {zstd_err}") from None
            finally:
                self._dctxs.append(d)
        if len(page) != PAGE:
            raise OSError(errno.EIO, "pool object did not decompress to a page")
        return page

    def gather(self, pages: list[bytes], blobs: list[tuple[int, bytes]]) -> bytes | None:
        """``pages`` (a page each) with the pool objects ``blobs`` (index,
        object) decoded into their places, as one bytes object: lz4 blocks
        are decoded by the C module straight into it, other objects by
        :meth:`decode` first.  A corrupt object raises OSError(EIO), as
        :meth:`decode` does.  None when the C module is not there or a fault
        is armed, or for more pages than it takes: the caller decodes and
        joins.  ``pages`` is changed."""
        if _ARMED:
            return None
        lz, skip = self._lz4, 0
        if lz is None:
            lz, skip = self._lz4_decoder, 1  # marked: stored first with lz4 in a zstd space
            if lz is None:  # no lz4 here yet: not loaded in the middle of a burst for this
                return None
        native = lz.gather
        if native is None or len(pages) > lz.gather_max:  # FUSE's reads are never larger
            return None
        for i, blob in blobs:
            # a page-long object is a raw page; an lz4 block goes to C as it is
            pages[i] = blob if len(blob) == PAGE or not skip or blob[0] == 0 else self.decode(blob)
        try:
            return native(pages, skip)
        except ValueError as e:
            raise OSError(errno.EIO, f"pool object does not decompress: {e}") from None

    def recompress(self, blob: bytes) -> bytes | None:
        """A pool object compressed again at ``level``: the new object, or
        None if that is not smaller (it was stored at ``level`` already, or
        the page gains nothing).  A corrupt object raises OSError(EIO)."""
        if len(blob) >= PAGE or not self.two_step:
            return None
        out = self.compress(self.decode(blob), self.level)
        return out if len(out) < len(blob) else None

    def encode_pages(self, data: memoryview,
                     level: int | None = None) -> list[tuple[int, bytes | None]] | None:
        """The whole pages of ``data``, each as :meth:`encode` makes it, in
        one call into the C module when pages are stored first with lz4 and
        it was built: no bytes object per page to compare, slice and
        compress (``data`` is read, not kept).  None when that is not how
        they are stored (a zstd ``level``, python-lz4, a fault armed): the
        caller then encodes page by page."""
        if _ARMED:
            return None
        lz, mark = self._lz4, False
        if lz is None:
            lz, mark = self._first_lz4, True
            if lz is None or level is not None:
                return None
        many = lz.encode_pages
        if many is None:
            return None
        out: list[tuple[int, bytes | None]] = []
        for i, got in enumerate(many(data, mark, min(self.huge_threshold, PAGE - 1))):
            if got is None:  # compresses poorly: kept raw
                out.append((0, None))
            elif isinstance(got, bytes):
                out.append((0, got))
            else:  # same-filled
                word = E.same_word(got)
                out.append((word, None) if word is not None
                           else self.encode(data[i * PAGE:(i + 1) * PAGE].tobytes(), level))
        return out

    def encode(self, page: bytes, level: int | None = None) -> tuple[int, bytes | None]:
        """(SAME word, None) for a same-filled page, else (0, payload) where
        the payload is the compressed page (at ``first_level`` unless
        ``level`` says otherwise), or None if it compresses poorly."""
        if page == _ZERO_PAGE:
            return ZERO_WORD, None
        head = page[:8]
        if page[-8:] == head and page[2048:2056] == head and page == head * (PAGE // 8):
            word = E.same_word(int.from_bytes(head, "little"))
            if word is not None:
                return word, None
        blob = self.compress(page, level)
        if len(blob) > self.huge_threshold or len(blob) >= PAGE:  # a 4096-byte object is a raw page
            return 0, None
        return 0, blob
