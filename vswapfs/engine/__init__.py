"""The swap engine: virtual slots, dynamic clusters and their backends.

Knows nothing about FUSE.  The public surface is :class:`SwapSpace`; the
entry-word helpers live in :mod:`vswapfs.engine.entry`.
"""

from .._consts import CLUSTER_SLOTS, CODECS, DEFAULT_CODEC, DEFAULT_LEVEL, PAGE
from . import _entry as entry
from ._backing import BackingChecksumError, BackingFile
from ._codec import DEFAULT_HUGE_THRESHOLD
from ._placement import DEFAULT_ACCEPT_THRESHOLD, NoSpaceError
from ._space import SwapSpace, kept_size
from ._stats import COUNTERS, DESCRIPTIONS, GAUGES

__all__ = [
    "CLUSTER_SLOTS", "CODECS", "COUNTERS", "DEFAULT_ACCEPT_THRESHOLD", "DEFAULT_CODEC",
    "DEFAULT_HUGE_THRESHOLD", "DEFAULT_LEVEL", "DESCRIPTIONS", "GAUGES", "PAGE",
    "BackingChecksumError", "BackingFile", "NoSpaceError", "SwapSpace", "entry", "kept_size",
]
