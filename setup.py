"""Build vswapfs with its serving path compiled by mypyc, or as pure Python.

The modules in ``COMPILED`` (the engine's table, pool and placement, the
FUSE session, request reader and replies, the swap file system) are the
Python a swap request runs through; mypyc compiles their typed source to C
extension modules, which take about a quarter fewer instructions per
request (docs/sustained.md, "Compiled with mypyc").  The source stays the
one truth: the same modules run as pure Python, and do so

* when ``VSWAPFS_PURE=1`` is set,
* when the build cannot compile (no mypyc in the build environment, no C
  compiler, no ``Python.h``): the build says so and goes on.

With the compiled modules come two written in C, the codec's lz4
(``vswapfs/engine/_lz4page.c``; where it does not build, no
``liblz4.so.1``, python-lz4 does its work) and a channel thread's READ and
WRITE (``vswapfs/fuse/_wire.c``; where it does not build, the session's
Python does it).  ``python3 -m vswapfs
--version`` tells which build is installed.  In an
editable install (``pip install -e .``) the compiled modules sit next to
their source and shadow it: run the install again after an edit (the
tests refuse to run on stale ones: the build records what it compiled,
see ``vswapfs._build.stale_modules``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The request path (vswapfs/_build.py lists it, for the checks of what is
# installed).  Not in it: _backing, whose objects the tests replace methods
# of (a compiled class's methods are fixed), and the rest, which runs once a
# mount or once a second, not once a request.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vswapfs._build import BUILT_FROM, NATIVE_LZ4, NATIVE_WIRE, SERVING_MODULES, source_digest

COMPILED = [name.replace(".", "/") + ".py" for name in SERVING_MODULES]

# The codec's lz4 in C (vswapfs/engine/_lz4page.c): built beside the mypyc
# modules, with no header (it declares the few lz4 functions it calls) and
# linked against liblz4.so.1 itself.  Optional on its own: where it does
# not build, python-lz4 does its work (vswapfs.engine._codec.Lz4).
LZ4_PAGE = Extension(NATIVE_LZ4, ["vswapfs/engine/_lz4page.c"], libraries=[":liblz4.so.1"])
# A channel thread's READ and WRITE in C (vswapfs/fuse/_wire.c), no library.
# Optional too: where it does not build, Session._serve_data does its work.
WIRE = Extension(NATIVE_WIRE, ["vswapfs/fuse/_wire.c"])
NATIVE = (NATIVE_LZ4, NATIVE_WIRE)  # the modules written in C, each optional


def _why_not_compiled() -> str | None:
    """Why this build cannot compile, None if it can."""
    if os.environ.get("VSWAPFS_PURE") == "1":
        return "VSWAPFS_PURE=1"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "no Python.h (install python3-dev)"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "no mypyc in the build environment"
    return None


class OptionalBuildExt(build_ext):
    """build_ext that falls back to pure Python when compiling fails: the
    modules' source is installed either way, so a failed compile leaves
    nothing half-built behind and the package still imports."""

    def build_extension(self, ext: Any) -> None:
        if ext.name not in NATIVE:
            super().build_extension(ext)
            return
        try:
            super().build_extension(ext)
        except Exception as e:  # for lz4, no liblz4.so.1 most likely: the mypyc modules stay
            what = ("the C lz4 page codec", "python-lz4") if ext.name == NATIVE_LZ4 else (
                "the C data path", "Python")
            print(f"vswapfs: {what[0]} did not build ({e}); {what[1]} does its work", file=sys.stderr)

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # a compiler error of any kind: say so, install pure Python
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.unlink(path)
            self.extensions = []
            print(f"vswapfs: compiling with mypyc failed ({e}); installing pure Python",
                  file=sys.stderr)
            return
        if any(ext.name not in NATIVE for ext in self.extensions):  # what they were built
            # from, for _build.stale_modules
            where = os.path.join("." if self.inplace else self.build_lib, "vswapfs", BUILT_FROM)
            with open(where, "w") as f:
                json.dump({name: source_digest(name) for name in SERVING_MODULES}, f, indent=1)


def _extensions() -> list[Any]:
    why = _why_not_compiled()
    if why is None:
        from mypyc.build import mypycify
        try:
            # the third-party libraries need not be in the build environment:
            # to mypyc their calls are calls into Python either way
            return [*mypycify(["--ignore-missing-imports", *COMPILED], opt_level="3"), LZ4_PAGE, WIRE]
        except (Exception, SystemExit) as e:  # mypyc refused the source: same fallback
            # (on a type error mypyc prints it and exits)
            why = "mypyc: type errors, above" if isinstance(e, SystemExit) else f"mypyc: {e}"
            print(f"vswapfs: building pure Python ({why}), lz4 and the data path in C", file=sys.stderr)
            return [LZ4_PAGE, WIRE]
    print(f"vswapfs: building pure Python ({why})", file=sys.stderr)
    return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
