"""The swap engine: virtual slots, dynamic clusters and their backends.

Knows nothing about FUSE.  The public surface is :class:`SwapSpace`; the
entry-word helpers live in :mod:`vswapfs.engine.entry`.
"""

from . import _entry as entry
from ._backing import BackingChecksumError, BackingFile
from ._space import (
    CLUSTER_SLOTS,
    CODECS,
    DEFAULT_ACCEPT_THRESHOLD,
    DEFAULT_CODEC,
    DEFAULT_HUGE_THRESHOLD,
    DEFAULT_LEVEL,
    PAGE,
    NoSpaceError,
    SwapSpace,
)
from ._stats import COUNTERS, DESCRIPTIONS, GAUGES

__all__ = [
    "CLUSTER_SLOTS", "CODECS", "COUNTERS", "DEFAULT_ACCEPT_THRESHOLD", "DEFAULT_CODEC",
    "DEFAULT_HUGE_THRESHOLD", "DEFAULT_LEVEL", "DESCRIPTIONS", "GAUGES", "PAGE",
    "BackingChecksumError", "BackingFile", "NoSpaceError", "SwapSpace", "entry",
]
