"""The swap engine: virtual slots, dynamic clusters and their backends.

Knows nothing about FUSE.  The public surface is :class:`SwapSpace`; the
entry-word helpers live in :mod:`vswapfs.engine.entry`.
"""

from . import _entry as entry
from ._backing import BackingChecksumError, BackingFile
from ._space import (
    CLUSTER_SLOTS,
    DEFAULT_ACCEPT_THRESHOLD,
    DEFAULT_HUGE_THRESHOLD,
    DEFAULT_LEVEL,
    PAGE,
    NoSpaceError,
    SwapSpace,
)

__all__ = [
    "CLUSTER_SLOTS", "DEFAULT_ACCEPT_THRESHOLD", "DEFAULT_HUGE_THRESHOLD", "DEFAULT_LEVEL",
    "PAGE", "BackingChecksumError", "BackingFile", "NoSpaceError", "SwapSpace", "entry",
]
