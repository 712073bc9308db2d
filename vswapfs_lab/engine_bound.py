"""What the engine costs a sustained write: the same daemon with its engine cut out.

The write target (within 1.25x the C floor) is missed on some hosts, and the
daemon's CPU time is what bounds it.  Before calling the rest a limit, this
measures how much of that time the engine (the pool, the virtual tables,
their gauges and the store policy) takes, against what the daemon's request
path and its compression take, by running, interleaved, with the same
usemem as the bench (``vswapfs.workload``, every page verified):

- ``fuse-floor-c`` and ``fuse-floor-c-lz4``: the C floors (``bench.floor_backend``);
- ``vswapfs``: the daemon as installed;
- ``vswapfs-dict-lz4``: the same daemon, built from this checkout in a
  temporary directory, whose ``SwapSpace.write`` encodes a write's pages as
  the first store does (same-filled pages as their value, else lz4, raw if
  poor) and keeps them in a dict under the engine's lock, and whose ``read``
  serves them from there: the request path and the compression, no engine;
- ``vswapfs-dict-raw``: the same with raw pages: the request path alone.

Only the image's first MiB (the swap header) goes to the engine in the two
cut variants; they keep every page ever written (a discard frees nothing):
a yardstick for one run, not a daemon.  ``python3 -m vswapfs_lab.engine_bound
--rounds 3`` (about 3 minutes a round of the five here, plus 80 s to build the variants).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from vswapfs._build import BUILT_FROM

from . import bench

ROOT = Path(__file__).resolve().parent.parent  # the checkout the variants are built from
CUT_ENV = "VSWAPFS_LAB_CUT"  # read by the variants' SwapSpace: "lz4" or "raw"
VARIANTS = {"vswapfs-dict-lz4": "lz4", "vswapfs-dict-raw": "raw"}
BACKENDS = ("fuse-floor-c", "fuse-floor-c-lz4", "vswapfs", *VARIANTS)
HEADER_PAGES = (1 << 20) // 4096  # the image's first MiB, which the variants leave to the engine

# The cut: the variants' globals, and what their write() and read() do first.
_CUT_MODULE = '''
_LAB_CUT: Final = os.environ.get("VSWAPFS_LAB_CUT", "")  # vswapfs_lab.engine_bound's variants
_LAB_PAGES: dict[int, int | bytes] = {}  # slot -> same-filled value's word or the stored page


'''
_CUT_WRITE = '''        if _LAB_CUT and offset >= 1 << 20:
            if (offset | n) % PAGE:
                raise OSError(errno.EINVAL, "the engine_bound variants take whole pages only")
            view = memoryview(data).cast("B")
            count = n // PAGE
            kept: list[tuple[int, bytes | None]] | None = None
            if _LAB_CUT == "lz4":  # as write() encodes: a write's pages in one call, or one at a time
                kept = self._codec.encode_pages(view, None)
                if kept is None:
                    kept = [self._codec.encode(view[i * PAGE:(i + 1) * PAGE].tobytes(), None)
                            for i in range(count)]
            with self._lock:
                for i in range(count):
                    one = view[i * PAGE:(i + 1) * PAGE]
                    if kept is None:
                        _LAB_PAGES[offset // PAGE + i] = one.tobytes()
                    else:
                        word, blob = kept[i]
                        _LAB_PAGES[offset // PAGE + i] = word or (one.tobytes() if blob is None else blob)
            return
'''
_CUT_READ = '''        if _LAB_CUT and offset >= 1 << 20:
            if (offset | size) % PAGE:
                raise OSError(errno.EINVAL, "the engine_bound variants take whole pages only")
            with self._lock:
                got = [_LAB_PAGES.get(offset // PAGE + i) for i in range(size // PAGE)]
            parts: list[bytes] = []
            for v in got:
                if v is None:
                    parts.append(_ZERO_PAGE)
                elif isinstance(v, int):
                    parts.append(_ZERO_PAGE if v == ZERO_WORD else E.same_page(v))
                else:
                    parts.append(v if len(v) == PAGE else self._codec.decode(v))
            return parts[0] if len(parts) == 1 else b"".join(parts)
'''
# Where the cut goes in vswapfs/engine/_space.py: each anchor must be there
# once, or building the variants fails (the source moved on: mend the cut).
MODULE_ANCHOR = "\nclass SwapSpace:"  # the cut's globals go before it
WRITE_ANCHOR = "        n = len(data)\n        self._check(offset, n)\n"  # _CUT_WRITE between the two
READ_ANCHOR = "        self._check(offset, size)\n        if not size:\n"  # _CUT_READ between the two


def cut_source(dest: Path, src: Path = ROOT) -> Path:
    """Copy the package and setup.py from ``src`` to ``dest`` with the cut
    applied to ``vswapfs/engine/_space.py``; returns that file's path."""
    shutil.copytree(src / "vswapfs", dest / "vswapfs",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", BUILT_FROM))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(src / name, dest / name)
    path = dest / "vswapfs" / "engine" / "_space.py"
    text = path.read_text()
    for anchor in (MODULE_ANCHOR, WRITE_ANCHOR, READ_ANCHOR):
        if text.count(anchor) != 1:
            raise RuntimeError(f"{path}: the cut's anchor {anchor.strip()!r} is not there once")
    text = text.replace(MODULE_ANCHOR, _CUT_MODULE + MODULE_ANCHOR.lstrip("\n"))
    for anchor, cut in ((WRITE_ANCHOR, _CUT_WRITE), (READ_ANCHOR, _CUT_READ)):
        first, second = anchor.splitlines(keepends=True)
        text = text.replace(anchor, first + cut + second)
    path.write_text(text)
    return path


def build_variants(dest: Path) -> None:
    """Cut and compile the variants' daemon in ``dest`` (as ``pip install``
    compiles the installed one); RuntimeError if it did not compile."""
    cut_source(dest)
    env = {k: v for k, v in os.environ.items() if k != "VSWAPFS_PURE"}
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=dest, env=env,
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"building the variants failed: {run.stderr[-2000:]}")
    kind = subprocess.run([sys.executable, "-c", "import vswapfs._build as b; print(b.kind())"],
                          cwd="/", env={**env, "PYTHONPATH": str(dest)}, capture_output=True, text=True)
    if kind.stdout.strip() != "mypyc":
        raise RuntimeError(f"the variants did not compile: {kind.stdout.strip() or kind.stderr[-500:]}")


def backend(name: str, variants: Path | None) -> bench.Backend:
    """The named backend; a variant's daemon starts from ``variants``."""
    if name.startswith("fuse-floor-c"):
        return bench.floor_backend(lz4=name.endswith("-lz4"))
    b = bench.vswapfs_backend(name, ["--size", "4G"])
    if name not in VARIANTS:
        return b
    assert variants is not None
    up = b.up

    def up_cut() -> None:
        with bench.environ(PYTHONPATH=str(variants), **{CUT_ENV: VARIANTS[name]}):
            up()
    return dataclasses.replace(b, up=up_cut)


def one_round(b: bench.Backend, limit_mib: int, mib: int, pages: list[str]) -> dict[str, float]:
    """usemem on ``b``: write and verify every page (a bad page fails the run)."""
    with bench.brought_up(b):
        r, _ = bench.run_workload(b, limit_mib, [sys.executable, "-m", "vswapfs.workload",
                                                 "--mib", str(mib), *pages])
        if b.name in VARIANTS:  # the cut ran: past the first MiB, no page reached the engine
            stored = int(Path(str(b.state["mnt"]), "control", "stored_pages").read_text())
            if stored > HEADER_PAGES:
                raise RuntimeError(f"{b.name}: the engine holds {stored} pages: the cut did not run")
    return {k: float(r[k]) for k in ("write_s", "verify_s", "write_cpu_s", "verify_cpu_s")}


def table(rows: dict[str, list[dict[str, float]]]) -> str:
    """Medians, and the write's ratio to the C floor's, as markdown."""
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in rows.items() if rs}
    floor = med.get("fuse-floor-c", {}).get("write_s")
    lines = ["| backend | write s (CPU-s) | write / floor | verify s (CPU-s) | rounds |",
             "| --- | --- | --- | --- | --- |"]
    for n, m in med.items():
        ratio = f"{m['write_s'] / floor:.2f}x" if floor else "-"
        lines.append(f"| {n} | {m['write_s']:.2f} ({m['write_cpu_s']:.2f}) | {ratio} | "
                     f"{m['verify_s']:.2f} ({m['verify_cpu_s']:.2f}) | {len(rows[n])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m vswapfs_lab.engine_bound", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=512, help="the cgroup's MiB (default 512)")
    p.add_argument("--mib", type=int, default=2048, help="MiB written (default 2048)")
    p.add_argument("--pages", choices=("files", "text-random"), default="files",
                   help="files: the bench's usemem (zero, file text and random pages); "
                        "text-random: the latency workload's (text and random, no zero)")
    p.add_argument("--only", default=",".join(BACKENDS), help="backends, comma-separated")
    p.add_argument("--out", type=Path, help="write every round there as JSON")
    a = p.parse_args(argv)
    names = [n for n in a.only.split(",") if n]
    bad = [n for n in names if n not in BACKENDS]
    if not names or bad:
        p.error(f"no backend {', '.join(bad) or 'named'}; there are {', '.join(BACKENDS)}")
    for flag, value in (("--rounds", a.rounds), ("--limit", a.limit), ("--mib", a.mib)):
        if value < 1:
            p.error(f"{flag} must be at least 1, not {value}")
    pages = ["--files"] if a.pages == "files" else ["--mix", "0:1:1"]
    rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="vswapfs-engine-bound-") as tmp:
        variants = Path(tmp) if any(n in VARIANTS for n in names) else None
        if variants is not None:
            build_variants(variants)
        for rnd in range(a.rounds):
            for n in names:
                row = one_round(backend(n, variants), a.limit, a.mib, pages)
                rows[n].append(row)
                print(json.dumps({"round": rnd + 1, "backend": n, **row}), flush=True)
    print(f"\n{a.mib} MiB ({a.pages}) through a {a.limit} MiB cgroup, medians of {a.rounds} "
          f"interleaved rounds:\n\n{table(rows)}")
    if a.out:
        a.out.write_text(json.dumps({"mib": a.mib, "limit": a.limit, "pages": a.pages, "rows": rows},
                                    indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
