"""The codec: what a page becomes before it is stored, and back.

A page is either same-filled (one 8-byte value repeated: it then lives in
its table word, see ``_entry``), or compressed with zstd (level 1 by
default) or lz4, or, when it compresses worse than ``huge_threshold``,
"poor" and kept raw.  The codec is fixed for a space's life: the pool
holds its output.

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

from .._consts import CODECS, DEFAULT_CODEC, PAGE
from . import _entry as E
from . import _inject

DEFAULT_LEVEL: Final = 1
MIN_LEVEL: Final = -100  # zstd's fast levels (negative) trade ratio for speed
MAX_LEVEL: Final = zstandard.MAX_COMPRESSION_LEVEL
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


class Codec:
    """Encodes pages for the table and the pool, and decodes pool objects.

    ``level`` and ``huge_threshold`` may change at any time (a plain
    attribute store); a page in flight uses the value it read.
    """

    def __init__(self, name: str = DEFAULT_CODEC, level: int = DEFAULT_LEVEL,
                 huge_threshold: int = DEFAULT_HUGE_THRESHOLD) -> None:
        if name not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, not {name!r}")
        self.name = name
        self._lz4: ModuleType | None = None  # lz4.block when the codec is lz4
        if name == "lz4":  # imported only when used: loaded in a zstd daemon, it cost a
            # point of the memory returned after a burst in the bench (98.7% vs 99.7%)
            import lz4.block
            self._lz4 = lz4.block
        self.level = level if name == "zstd" else 0
        self.huge_threshold = huge_threshold
        self._cctxs: list[tuple[int, zstandard.ZstdCompressor]] = []  # idle (level, compressor)
        self._dctxs: list[zstandard.ZstdDecompressor] = []  # idle decompressors

    def warm(self) -> None:
        """Make the first contexts now, not in the first burst."""
        blob = self.encode(_WARM_PAGE)[1]
        if blob is not None:
            self.decode(blob)

    def compress(self, page: bytes) -> bytes:
        """The page compressed (may be longer than the page)."""
        if _inject.armed:
            _inject.point("codec.compress")
        if self._lz4:  # stateless: no context to pool
            out: bytes = self._lz4.compress(page, store_size=False)
            return out
        level = self.level
        try:
            lv, c = self._cctxs.pop()  # list.pop and append are atomic under the GIL
            if lv != level:
                c = _compressor(level)
        except IndexError:
            c = _compressor(level)
        try:
            return c.compress(page)
        except zstandard.ZstdError as e:  # zstd fails only when it cannot allocate
            raise MemoryError(f"zstd: {e}") from None
        finally:
            self._cctxs.append((level, c))

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

    def encode(self, page: bytes) -> tuple[int, bytes | None]:
        """(SAME word, None) for a same-filled page, else (0, payload) where
        the payload is the compressed page, or None if it compresses poorly."""
        if page == _ZERO_PAGE:
            return ZERO_WORD, None
        head = page[:8]
        if page[-8:] == head and page[2048:2056] == head and page == head * (PAGE // 8):
            word = E.same_word(int.from_bytes(head, "little"))
            if word is not None:
                return word, None
        blob = self.compress(page)
        if len(blob) > self.huge_threshold or len(blob) >= PAGE:  # a 4096-byte object is a raw page
            return 0, None
        return 0, blob
