# The C module vswapfs/engine/_lz4page.c (see there): lz4 for pages.
from typing import Final

LIBRARY_VERSION: Final[int]  # liblz4's, as LZ4_versionNumber gives it (10904 for 1.9.4)

def compress(page: bytes | bytearray | memoryview, mark: bool, /) -> bytes: ...
def decompress(blob: bytes | bytearray | memoryview, skip: int, size: int, /) -> bytes: ...
def encode_pages(
    data: bytes | bytearray | memoryview, mark: bool, limit: int, /
) -> list[int | bytes | None]: ...
