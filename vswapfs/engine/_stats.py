"""Counters and gauges of the swap engine, named as zram and zswap users know
them.  Each name's one-line description lives here, once; the control
files, the Prometheus ``metrics`` file and the README table use it."""

from __future__ import annotations

from typing import Final

# Event counters: they only grow (mem_used_max only rises).
COUNTERS: Final[dict[str, str]] = {
    "mem_used_max": "peak of mem_used_total, bytes (zram)",
    "huge_pages_since": "pages ever stored raw in the pool (zram)",
    "pages_compacted": "4 KiB pages freed by pool compaction (zram)",
    "written_back_pages": "pool pages moved to a backing file (zswap)",
    "reject_compress_poor": "pages that compressed worse than huge_threshold (zswap)",
    "pool_limit_hit": "times the pool reached its limit (zswap)",
    "failed_reads": "read requests that failed (zram io_stat)",
    "failed_writes": "write requests that failed (zram io_stat)",
    "invalid_io": "requests outside the space (zram io_stat)",
    "notify_free": "stored pages freed by discard (zram io_stat)",
    "swapoff_freed_pages": "pages freed when swap went off the image (the kernel sends no discard then)",
    "bd_reads": "pages read from backing files (zram bd_stat)",
    "bd_writes": "pages written to backing files (zram bd_stat)",
    "bd_read_errors": "backing-file page reads that failed (I/O error or checksum)",
    "bd_write_errors": "backing-file writes that failed; those pages stayed where they were",
    "checksum_failures": "backing pages whose xxh3 checksum did not match",
    "clusters_created": "virtual clusters ever created",
    "clusters_freed": "virtual clusters dropped after their last slot was freed",
    "evacuated_pages": "pages moved out of a backing file being removed",
    "recovered_pages": "pages this process took over from the tables of a daemon that died or was restarted",
    "recovery_lost_pages": "table words at takeover whose data was gone (cleared; a bug if not 0)",
    "recompressed_pages": "pool pages stored first (lz4, or zstd at first_level) and made denser at "
                          "the level, when idle",
    "recompress_saved_bytes": "bytes of pool payload that recompression saved",
    "spare_waits": "writes that found no pool chunk faulted in and waited for housekeeping to fault some",
}

# Gauges: the state now.
GAUGES: Final[dict[str, str]] = {
    "disksize": "bytes of virtual swap space (zram disksize)",
    "stored_pages": "slots holding data, any backend",
    "zero_pages": "same-filled pages, kept in their table word only",
    "same_pages": "zram's name for zero_pages",
    "pool_pages": "pages in the compressed pool",
    "phys_pages": "pages in backing files",
    "huge_pages": "pool pages kept raw because they did not compress",
    "orig_data_size": "bytes of data stored, before compression (zram)",
    "compr_data_size": "bytes of compressed payload in the pool (zram)",
    "mem_used_total": "bytes of memory the pool holds (zram)",
    "mem_limit": "pool limit in bytes, 0 for none (zram)",
    "pool_reserve": "bytes of pool memory committed at start and kept (reserve mode), 0 for none",
    "pool_spare": "bytes of pool chunks faulted in ahead and not in use: what stores take without faulting",
    "pool_chunks": "pool chunks in use",
    "clusters": "virtual clusters live",
    "metadata_bytes": "bytes of virtual tables, rmaps and checksums",
    "bd_count": "pages on backing files (zram bd_stat)",
    "backing_files": "backing files in use",
    "backing_allocated_bytes": "bytes the file systems allocated to backing files",
    "pool_full": "1 while the limit refuses stores, until usage drops below accept_threshold",
}

DESCRIPTIONS: Final[dict[str, str]] = {**GAUGES, **COUNTERS}


class Counters:
    """The event counters above, as typed attributes: the engine's hot
    paths bump them with a plain ``+= 1`` under the engine lock."""

    __slots__ = tuple(COUNTERS)

    mem_used_max: int
    huge_pages_since: int
    pages_compacted: int
    written_back_pages: int
    reject_compress_poor: int
    pool_limit_hit: int
    failed_reads: int
    failed_writes: int
    invalid_io: int
    notify_free: int
    swapoff_freed_pages: int
    bd_reads: int
    bd_writes: int
    bd_read_errors: int
    bd_write_errors: int
    checksum_failures: int
    clusters_created: int
    clusters_freed: int
    evacuated_pages: int
    recovered_pages: int
    recovery_lost_pages: int
    recompressed_pages: int
    recompress_saved_bytes: int
    spare_waits: int

    def __init__(self) -> None:
        for name in COUNTERS:  # (not __slots__: a compiled class has none at run time)
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}
