"""Counters of the swap engine, named as zram and zswap users know them."""

from __future__ import annotations


class Counters:
    """Event counters: they only grow (``mem_used_max`` only rises).

    Gauges (pages per backend, memory in use, clusters live) are kept by the
    engine itself and merged in :meth:`vswapfs.engine.SwapSpace.stats`.
    """

    __slots__ = (
        "mem_used_max", "huge_pages_since", "pages_compacted", "written_back_pages",
        "reject_compress_poor", "pool_limit_hit", "failed_reads", "failed_writes",
        "invalid_io", "notify_free", "bd_reads", "bd_writes", "bd_read_errors",
        "bd_write_errors", "checksum_failures", "clusters_created", "clusters_freed",
        "evacuated_pages",
    )

    def __init__(self) -> None:
        self.mem_used_max = 0  # peak of mem_used_total, bytes (zram)
        self.huge_pages_since = 0  # pages ever stored raw in the pool (zram)
        self.pages_compacted = 0  # 4 KiB pages freed by compaction (zram)
        self.written_back_pages = 0  # pool pages moved to a backing file (zswap)
        self.reject_compress_poor = 0  # pages that compressed worse than huge_threshold (zswap)
        self.pool_limit_hit = 0  # times the pool limit was reached (zswap)
        self.failed_reads = 0  # read requests that failed (zram io_stat)
        self.failed_writes = 0  # write requests that failed (zram io_stat)
        self.invalid_io = 0  # requests outside the space (zram io_stat)
        self.notify_free = 0  # stored pages freed by discard (zram io_stat)
        self.bd_reads = 0  # pages read from backing files (zram bd_stat)
        self.bd_writes = 0  # pages written to backing files (zram bd_stat)
        self.bd_read_errors = 0  # backing-file page reads that failed (I/O error or checksum)
        self.bd_write_errors = 0  # backing-file writes that failed; the pages stayed put
        self.checksum_failures = 0  # backing pages whose xxh3 did not match
        self.clusters_created = 0  # virtual clusters ever created
        self.clusters_freed = 0  # virtual clusters dropped after their last slot was freed
        self.evacuated_pages = 0  # pages moved out of a backing file being removed

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}
