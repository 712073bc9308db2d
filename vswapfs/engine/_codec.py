"""The codec: what a page becomes before it is stored, and back.

A page is either same-filled (one 8-byte value repeated: it then lives in
its table word, see ``_entry``), or compressed with zstd or lz4, or, when
it compresses worse than ``huge_threshold``, "poor" and kept raw.  The
codec is fixed for a space's life: the pool holds its output.

zstd stores in two steps.  A page being swapped out is compressed at
``first_level`` (-1 by default: half the time of level 1 on real-file
pages here, a fifth larger); :meth:`Codec.recompress` later makes it
``level`` (1 by default), in the background, once the daemon is idle (see
``SwapSpace.recompress``).  Any zstd frame decodes the same way whatever
level made it, so nothing records which level a page has: a page is worth
recompressing if the result is smaller.  With ``first_level`` equal to
``level`` (or lz4) there is one step; once the pool is past half its limit,
``SwapSpace.write`` stores at ``level`` at once (density matters more than
speed there).

No lock: compression runs on the caller's thread, outside the engine lock
(zstandard and lz4 release the GIL).  zstd contexts are shared through a
small free list rather than kept per thread: a thread that compresses once
does not keep a context for good, and the first ones are made (and their
code faulted in) at start, not in the middle of a burst.
"""

from __future__ import annotations

import errno
from types import ModuleType
from typing import Final

import zstandard
from mypy_extensions import mypyc_attr

from .._consts import CODECS, DEFAULT_CODEC, DEFAULT_FIRST_LEVEL, DEFAULT_LEVEL, PAGE, ZSTD_LEVELS
from . import _entry as E
from . import _inject

MIN_LEVEL, MAX_LEVEL = ZSTD_LEVELS  # zstd's fast levels (negative) trade ratio for speed
assert MAX_LEVEL == zstandard.MAX_COMPRESSION_LEVEL, "ZSTD_LEVELS is not this zstd's"
DEFAULT_HUGE_THRESHOLD: Final = PAGE * 3 // 4

_ZERO_PAGE: Final = bytes(PAGE)
ZERO_WORD: Final = E.SAME  # the zero page's word: SAME, form 0, value 0 (what same_word(0) gives)
_WARM_PAGE: Final = b"vswapfs warms its zstd contexts up. " * 113 + bytes(28)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """A page compressor: no frame checksum, size or dictionary id (the
    table word knows the length).  zstd sizes its window and tables for
    the 4 KiB input by itself (an 86 KB context at level 1)."""
    return zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=False,
                                    write_dict_id=False)


def check_level(codec: str, level: int) -> None:
    """Raise ValueError unless ``level`` is a level ``codec`` has."""
    if codec != "zstd":
        raise ValueError(f"levels are zstd's; this space compresses with {codec}")
    if level == 0 or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"level must be a non-zero zstd level in {MIN_LEVEL}..{MAX_LEVEL}, not {level}")


@mypyc_attr(allow_interpreted_subclasses=True)  # compiled (setup.py); a test hooks a subclass in
class Codec:
    """Encodes pages for the table and the pool, and decodes pool objects.

    The levels (:meth:`set_levels`) and ``huge_threshold`` (a plain
    attribute store) may change at any time; a page in flight uses the
    values it read.
    """

    def __init__(self, name: str = DEFAULT_CODEC, level: int = DEFAULT_LEVEL,
                 huge_threshold: int = DEFAULT_HUGE_THRESHOLD,
                 first_level: int | None = DEFAULT_FIRST_LEVEL) -> None:
        if name not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, not {name!r}")
        self.name = name
        self._lz4: ModuleType | None = None  # lz4.block when the codec is lz4
        if name == "lz4":  # imported only when used: loaded in a zstd daemon, it cost a
            # point of the memory returned after a burst in the bench (98.7% vs 99.7%)
            import lz4.block
            self._lz4 = lz4.block
        self.level = 0  # the level pages end up at (0 with lz4), see set_levels
        self.fast_level: int | None = None  # the first store's level as set (None: ``level``)
        self.first_level = 0  # the first store's level in effect: never denser than ``level``
        self.huge_threshold = huge_threshold
        # idle compressors by level: the first store's and recompression's
        self._cctxs: dict[int, list[zstandard.ZstdCompressor]] = {}
        self._dctxs: list[zstandard.ZstdDecompressor] = []  # idle decompressors
        if name == "zstd":
            self.set_levels(level, first_level)

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

    @property
    def two_step(self) -> bool:
        """True if pages are first stored at a faster level than their final one."""
        return self.first_level != self.level

    def compress(self, page: bytes, level: int | None = None) -> bytes:
        """The page compressed (may be longer than the page), at
        ``first_level`` unless ``level`` says otherwise."""
        if _inject.armed:
            _inject.point("codec.compress")
        if self._lz4:  # stateless: no context to pool
            out: bytes = self._lz4.compress(page, store_size=False)
            return out
        if level is None:
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
        if _inject.armed:
            _inject.point("codec.decompress")
        if len(blob) == PAGE:
            return blob
        page: bytes
        if self._lz4:
            try:
                page = self._lz4.decompress(blob, uncompressed_size=PAGE)
            except self._lz4.LZ4BlockError as e:
                raise OSError(errno.EIO, f"pool object does not decompress: {e}") from None
        else:
            try:
                d = self._dctxs.pop()
            except IndexError:
                d = zstandard.ZstdDecompressor()
            try:
                page = d.decompress(blob, max_output_size=PAGE)
            except zstandard.ZstdError as e:
                raise OSError(errno.EIO, f"pool object does not decompress: {e}") from None
            finally:
                self._dctxs.append(d)
        if len(page) != PAGE:
            raise OSError(errno.EIO, "pool object did not decompress to a page")
        return page

    def recompress(self, blob: bytes) -> bytes | None:
        """A pool object compressed again at ``level``: the new object, or
        None if that is not smaller (it was stored at ``level`` already, or
        the page gains nothing).  A corrupt object raises OSError(EIO)."""
        if len(blob) >= PAGE or not self.two_step:
            return None
        out = self.compress(self.decode(blob), self.level)
        return out if len(out) < len(blob) else None

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
