"""Whether the serving path runs compiled by mypyc or as pure Python.

setup.py compiles ``SERVING_MODULES`` with mypyc when it can (see there);
this module tells which build is installed without importing any of them,
for ``vswapfs --version``, the daemon's log and ``control/build``.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
from typing import Final

# The Python a swap request runs through, in setup.py's order (paths there).
SERVING_MODULES: Final = (
    "vswapfs._fs",
    "vswapfs.engine._codec",
    "vswapfs.engine._entry",
    "vswapfs.engine._placement",
    "vswapfs.engine._pool",
    "vswapfs.engine._space",
    "vswapfs.engine._stats",
    "vswapfs.engine._table",
    "vswapfs.fuse._abi",
    "vswapfs.fuse._channel",
    "vswapfs.fuse._ops",
    "vswapfs.fuse._reader",
    "vswapfs.fuse._replies",
    "vswapfs.fuse._session",
    "vswapfs.fuse._types",
)


# The codec's lz4 in C (engine/_lz4page.c), built with the compiled modules
# where liblz4.so.1 is; python-lz4 does its work where it is not.
NATIVE_LZ4: Final = "vswapfs.engine._lz4page"
# A channel thread's READ and WRITE in C (fuse/_wire.c), built with them too;
# the session's Python serves them where it is not.
NATIVE_WIRE: Final = "vswapfs.fuse._wire"

PACKAGE_DIR: Final = os.path.dirname(os.path.abspath(__file__))
BUILT_FROM: Final = "_built_from.json"  # {module: sha256 of the source it was compiled from}


def _origin(name: str) -> str:
    """The file ``name`` imports from, found without importing it (or its
    package: ``vswapfs.engine`` imports the engine): an extension module
    before the source, as the import system looks."""
    base = os.path.join(PACKAGE_DIR, *name.split(".")[1:])
    for suffix in (*importlib.machinery.EXTENSION_SUFFIXES, ".py"):
        if os.path.exists(base + suffix):
            return base + suffix
    raise ImportError(f"no module {name} at {base}")


def compiled_modules() -> list[str]:
    """Those of ``SERVING_MODULES`` that import as extension modules."""
    return [name for name in SERVING_MODULES if not _origin(name).endswith(".py")]


def _built(name: str) -> bool:
    """True if the C module ``name`` (which has no Python source: it is there
    built or not at all) was built."""
    try:
        _origin(name)
    except ImportError:
        return False
    return True


def native_lz4() -> bool:
    """True if the codec's lz4 is the C module (``NATIVE_LZ4``)."""
    return _built(NATIVE_LZ4)


def native_wire() -> bool:
    """True if a channel thread's READ and WRITE are the C module's (``NATIVE_WIRE``)."""
    return _built(NATIVE_WIRE)


def describe() -> str:
    """What ``--version`` says of the build: ``mypyc build, lz4 and data path in C``
    and the like."""
    native = [what for what, built in (("lz4", native_lz4()), ("data path", native_wire())) if built]
    return f"{kind()} build" + (f", {' and '.join(native)} in C" if native else "")


def kind() -> str:
    """``mypyc`` (all compiled), ``python`` (none) or ``mixed`` (a broken
    install: some compiled, some not)."""
    n = len(compiled_modules())
    return "mypyc" if n == len(SERVING_MODULES) else "python" if n == 0 else "mixed"


def source_digest(name: str) -> str:
    """The sha256 of ``name``'s source file (setup.py records it at build)."""
    path = os.path.join(PACKAGE_DIR, *name.split(".")[1:]) + ".py"
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stale_modules() -> list[str]:
    """Compiled modules whose source changed since they were built (an
    editable install edited since ``pip install -e .``): their old code is
    what runs.  setup.py records each source's digest in ``BUILT_FROM``;
    without that record (a pure build) nothing is stale."""
    try:
        with open(os.path.join(PACKAGE_DIR, BUILT_FROM)) as f:
            built = json.load(f)
    except FileNotFoundError:
        return []
    return [name for name in compiled_modules() if built.get(name) != source_digest(name)]
