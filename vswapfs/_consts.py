"""The numbers every layer agrees on, defined once.

Kept free of imports so that the lightest command (``vswapfs status``)
can use them without loading the engine or the transport.
"""

from __future__ import annotations

from typing import Final

PAGE: Final = 4096  # bytes in a page, a virtual slot and a physical slot
CLUSTER_SLOTS: Final = 512  # slots per cluster, as the kernel's swap allocator
CLUSTER_BYTES: Final = PAGE * CLUSTER_SLOTS  # 2 MiB: the unit the kernel discards
FSTYPE: Final = "vswapfs"  # mounts are fuse.vswapfs; tools find them by it
MiB: Final = 1 << 20
SERVING_THREAD: Final = "vswapfs-serve"  # the daemon's channel threads' name (comm), for ps and the checks
CODECS: Final = ("zstd", "lz4")  # zstd for the ratio, lz4 for speed (zram's comp_algorithm)
DEFAULT_CODEC: Final = "zstd"
DEFAULT_LEVEL: Final = 1  # the zstd level pages end up at
DEFAULT_FIRST_LEVEL: Final = -1  # the zstd level a page is stored at first, until recompressed
FIRST_ALGORITHMS: Final = ("lz4", "zstd")  # what a zstd space stores a page with first
DEFAULT_FIRST_ALGORITHM: Final = "lz4"  # 1.6x faster than zstd -1 here, 13% larger, until recompressed
ZSTD_LEVELS: Final = (-100, 22)  # the levels accepted (0 is not one): zstd's fast ones to its max
VERSION: Final = "0.2.0"  # the package's version, as control/version reports it
# The environment every daemon runs in: every Python object from glibc
# malloc, one arena, no mmap'd blocks and no trimming on free, so memory
# once faulted in is reused, not handed back and faulted again (see _daemon).
DAEMON_ENV: Final = {
    "PYTHONMALLOC": "malloc",
    "GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                      "glibc.malloc.trim_threshold=4294967295",
}
