"""vswapfs_lab.engine_bound's variants: the cut applies to this source, and a
variant gives back every page it was given (else its timings would measure a
daemon that loses pages).  Nothing here is timed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vswapfs_lab import engine_bound

# Runs in a process whose vswapfs is the cut copy (pure Python: the copy has
# no compiled modules), with VSWAPFS_LAB_CUT set: every kind of page the
# kernel sends, written in requests of 1 and 3 pages, rewritten, read back
# one page and several pages at a time.
ROUND_TRIP = r'''
import os, random
from vswapfs.engine import _space
from vswapfs.engine._space import SwapSpace
assert _space._LAB_CUT == os.environ["VSWAPFS_LAB_CUT"]
PAGE, MIB = 4096, 1 << 20
rnd = random.Random(7)
text = b"".join(b"line %d of a page that compresses\n" % i for i in range(200))
def page(kind, n):
    if kind == 0:
        return bytes(PAGE)
    if kind == 1:
        return (n.to_bytes(8, "little")) * (PAGE // 8)
    if kind == 2:
        return (b"%08d" % n + text)[:PAGE]
    return rnd.randbytes(PAGE)
s = SwapSpace(64 * MIB)
s.write(0, b"header" + bytes(PAGE - 6))  # the first MiB: the engine's
want = {}
slot = MIB // PAGE
for n in range(400):
    count = 1 if n % 2 else 3
    pages = [page((n + i) % 4, n * 10 + i) for i in range(count)]
    s.write((slot + n % 150) * PAGE, b"".join(pages))  # rewrites too
    for i, p in enumerate(pages):
        want[slot + n % 150 + i] = p
for sl, p in want.items():
    assert s.read(sl * PAGE, PAGE) == p, sl
lo = min(want)
assert s.read(lo * PAGE, 8 * PAGE) == b"".join(want.get(lo + i, bytes(PAGE)) for i in range(8))
assert s.read(0, 6) == b"header"
assert s.stored_pages == 1  # the cut pages never reached the engine
try:
    s.write(MIB + 100, b"x")
except OSError as e:
    print("refused", e.errno)
print("ok", len(want))
'''


def test_the_cut_applies_to_this_source_once(tmp_path: Path) -> None:
    path = engine_bound.cut_source(tmp_path)
    text = path.read_text()
    assert text.count("_LAB_CUT and offset >= 1 << 20") == 2  # the write's and the read's
    assert not list(tmp_path.rglob("*.so"))  # a copy of the source only: built later
    compile(text, str(path), "exec")


def test_the_cut_refuses_a_source_it_no_longer_fits(tmp_path: Path) -> None:
    src = tmp_path / "src"
    engine_bound.cut_source(src)  # a copy to spoil
    space = src / "vswapfs" / "engine" / "_space.py"
    space.write_text(space.read_text().replace("        self._check(offset, size)\n", ""))
    with pytest.raises(RuntimeError, match="not there once"):
        engine_bound.cut_source(tmp_path / "dest", src=src)


@pytest.mark.parametrize("cut", ["lz4", "raw"])
def test_a_variant_gives_back_every_page_it_was_given(tmp_path: Path, cut: str) -> None:
    engine_bound.cut_source(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), engine_bound.CUT_ENV: cut}
    run = subprocess.run([sys.executable, "-c", ROUND_TRIP], cwd="/", env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["refused", "22", "ok", "151"]


def test_the_table_gives_medians_and_the_ratio_to_the_floor() -> None:
    def row(w: float) -> dict[str, float]:
        return {"write_s": w, "verify_s": 2 * w, "write_cpu_s": 1.5 * w, "verify_cpu_s": w}
    text = engine_bound.table({"fuse-floor-c": [row(10), row(9), row(30)],
                               "vswapfs-dict-raw": [row(11), row(12), row(13)]})
    assert "| fuse-floor-c | 10.00 (15.00) | 1.00x | 20.00 (10.00) | 3 |" in text
    assert "| vswapfs-dict-raw | 12.00 (18.00) | 1.20x | 24.00 (12.00) | 3 |" in text


@pytest.mark.parametrize("argv, says", [
    (["--only", "zram"], "no backend zram"),
    (["--only", ","], "no backend named"),
    (["--rounds", "0"], "--rounds must be at least 1, not 0"),
    (["--limit", "-5"], "--limit must be at least 1, not -5"),
    (["--mib", "0"], "--mib must be at least 1, not 0"),
])
def test_bad_options_are_one_clear_line_before_anything_is_built(
        argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        engine_bound.main(argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err
