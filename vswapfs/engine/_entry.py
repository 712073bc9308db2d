"""The ``virtual_table`` entry word: one 64-bit integer per virtual slot.

Like zram's ``zram_table_entry`` flags, every virtual slot is described by a
single word whose low 3 bits tag the backend and whose other bits hold what
that backend needs.  No Python object exists per slot: the words live in a
flat ``array('Q')`` per cluster (8 bytes a slot, as in the RFC).

Layout (bit 0 is the least significant)::

    63                                                         3 2   0
    +-----------------------------------------------------------+-----+
    |                        payload                            | tag |
    +-----------------------------------------------------------+-----+

    NONE  tag 0   whole word 0: free, reads as zeros.
    SAME  tag 1   a page of one repeated 8-byte word (zero pages too).
                  bit 3 is the form:
                    form 0: bits 4..63 = the word, as a signed 60-bit value
                            (covers 0, small integers, -1, user pointers);
                    form 1: bits 4..35 = a 32-bit word w, the page repeats
                            (w << 32) | w (covers every repeated byte,
                            16-bit and 32-bit pattern).
                  A repeated word that fits neither form is compressed.
    POOL  tag 2   bits 3..14  = compressed length - 1 (1..4096 bytes; 4096
                                means the page is kept raw, a "huge" page);
                  bits 15..63 = object index in the pool's size class,
                                which is itself derived from the length.
    PHYS  tag 3   bits 3..7   = backing-file index (0..31, as the kernel's
                                5-bit swap type);
                  bits 8..63  = physical slot (4 KiB page) in that file.

Tags 4..7 are unused and never stored.
"""

from __future__ import annotations

import struct
from typing import Final

from .._consts import PAGE

TAG_BITS: Final = 3
TAG_MASK: Final = (1 << TAG_BITS) - 1

NONE: Final = 0
SAME: Final = 1
POOL: Final = 2
PHYS: Final = 3
TAG_NAMES: Final = ("none", "same", "pool", "phys")

_LEN_SHIFT: Final = 3
_LEN_BITS: Final = 12
_OBJ_SHIFT: Final = _LEN_SHIFT + _LEN_BITS
MAX_POOL_OBJECT: Final = (1 << (64 - _OBJ_SHIFT)) - 1

_FILE_SHIFT: Final = 3
_FILE_BITS: Final = 5
_PSLOT_SHIFT: Final = _FILE_SHIFT + _FILE_BITS
MAX_BACKING_FILES: Final = 1 << _FILE_BITS
MAX_PHYS_SLOT: Final = (1 << (64 - _PSLOT_SHIFT)) - 1

_U64: Final = (1 << 64) - 1
_S60_MIN: Final = -(1 << 59)
_S60_MAX: Final = (1 << 59) - 1


def tag(word: int) -> int:
    """The backend tag of ``word`` (NONE, SAME, POOL or PHYS)."""
    return word & TAG_MASK


# --- SAME -----------------------------------------------------------------


def same_word(value: int) -> int | None:
    """Entry for a page filled with the 64-bit ``value``, or None if it does
    not fit either SAME form (the page is then compressed instead)."""
    signed = value - (1 << 64) if value >> 63 else value
    if _S60_MIN <= signed <= _S60_MAX:
        return ((signed & ((1 << 60) - 1)) << 4) | SAME
    low = value & 0xFFFFFFFF
    if value >> 32 == low:
        return (low << 4) | (1 << 3) | SAME
    return None


def same_value(word: int) -> int:
    """The repeated 64-bit value of a SAME entry."""
    if word & (1 << 3):
        low = (word >> 4) & 0xFFFFFFFF
        return (low << 32) | low
    v = word >> 4
    if v >> 59:  # negative 60-bit value: sign-extend to 64 bits
        v |= _U64 ^ ((1 << 60) - 1)
    return v & _U64


_Q: Final = struct.Struct("<Q")


def same_page(word: int) -> bytes:
    """The 4 KiB page a SAME entry stands for."""
    return _Q.pack(same_value(word)) * (PAGE // 8)


# --- POOL -----------------------------------------------------------------


def pool_word(obj: int, length: int) -> int:
    """Entry for a pool object of ``length`` bytes at index ``obj``."""
    return (obj << _OBJ_SHIFT) | ((length - 1) << _LEN_SHIFT) | POOL


def pool_length(word: int) -> int:
    """Compressed length in bytes of a POOL entry (4096: stored raw)."""
    return ((word >> _LEN_SHIFT) & ((1 << _LEN_BITS) - 1)) + 1


def pool_object(word: int) -> int:
    """Object index of a POOL entry within its size class."""
    return word >> _OBJ_SHIFT


# --- PHYS -----------------------------------------------------------------


def phys_word(file_index: int, pslot: int) -> int:
    """Entry for physical slot ``pslot`` of backing file ``file_index``."""
    return (pslot << _PSLOT_SHIFT) | (file_index << _FILE_SHIFT) | PHYS


def phys_file(word: int) -> int:
    """Backing-file index of a PHYS entry."""
    return (word >> _FILE_SHIFT) & ((1 << _FILE_BITS) - 1)


def phys_slot(word: int) -> int:
    """Physical slot of a PHYS entry."""
    return word >> _PSLOT_SHIFT
