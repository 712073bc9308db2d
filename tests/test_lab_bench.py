"""The benchmark harness's own logic: setup and teardown of every backend,
summaries, ratios, verdicts.  Nothing here is timed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import needs_root

from vswapfs import MiB, admin, linux, zswap
from vswapfs_lab import bench, bench_requests


def rows(**medians: float) -> list[dict[str, float]]:
    return [{k: v * f for k, v in medians.items()} for f in (0.9, 1.0, 1.3)]


def test_summary_medians_stdev_and_ratio_to_zram() -> None:
    s = bench.summarize({"zram-lzo-rle": rows(usemem_write_s=2.0, swapin_p50_us=10.0),
                         "vswapfs": rows(usemem_write_s=1.0, swapin_p50_us=80.0)})
    v = s["vswapfs"]["usemem_write_s"]
    assert v["median"] == 1.0 and v["n"] == 3 and math.isclose(v["mean"], (0.9 + 1.0 + 1.3) / 3)
    assert v["ratio"] == 0.5 and s["vswapfs"]["swapin_p50_us"]["ratio"] == 8.0
    assert s["zram-lzo-rle"]["usemem_write_s"]["ratio"] == 1.0


def test_verdicts_say_met_and_missed_honestly() -> None:
    s = bench.summarize({"zram-lzo-rle": rows(usemem_write_s=2.0, swapin_p50_us=10.0, peak_mem_mib=100),
                         "vswapfs": rows(usemem_write_s=1.0, swapin_p50_us=80.0, peak_mem_mib=70,
                                         returned_pct=95.0)})
    lines = bench.verdicts(s)
    assert any(line.startswith("MET") and "usemem write" in line for line in lines)
    assert any(line.startswith("MISSED") and "p50" in line and "8.00x" in line for line in lines)
    assert any(line.startswith("MET") and "memory at peak" in line for line in lines)
    assert any("returned" in line and line.startswith("MISSED") for line in lines)
    s = bench.summarize({"zram-lzo-rle": rows(returned_pct=100.0),
                         "vswapfs": rows(returned_pct=100.0, return99_s=0.05)})
    assert "MET    memory returned within 2 s: 100.0% (target ≥ 99%), 99% of it back 0.050 s after exit" \
        in bench.verdicts(s)


def test_verdicts_against_zram_are_left_out_when_zram_did_not_run() -> None:
    s = bench.summarize({"fuse-floor-c": rows(usemem_write_s=3.0),
                         "vswapfs": rows(usemem_write_s=4.5, returned_pct=100.0)})
    lines = bench.verdicts(s)
    assert not any("zram" in line for line in lines)
    assert any("memory returned" in line for line in lines)  # not a ratio to zram: still said
    assert "1.50x the floor" in "\n".join(bench.floor_verdicts(s))


def test_the_floor_with_lz4_gets_the_sustained_verdicts_when_it_ran() -> None:
    s = bench.summarize({"fuse-floor-c": rows(usemem_write_s=4.0, kv_rps=20_000.0),
                         "fuse-floor-c-lz4": rows(usemem_write_s=5.2, kv_rps=15_000.0),
                         "vswapfs": rows(usemem_write_s=7.6, kv_rps=12_000.0)})
    lines = bench.all_verdicts(s)
    at = next(i for i, line in enumerate(lines) if line.startswith("fuse-floor-c-lz4 ("))
    assert "1.30x the floor" in lines[at + 1] and lines[at + 1].startswith("MISSED")
    assert "0.75x the floor" in lines[at + 2]


def test_markdown_table_has_every_backend_and_missing_ones_named() -> None:
    s = bench.summarize({"zram-lzo-rle": rows(usemem_write_s=2.0), "vswapfs": rows(usemem_write_s=1.0)})
    md = bench.markdown(s, {"zswap-lzo": "zswap not built in"})
    assert "| metric | zram-lzo-rle | vswapfs |" in md and "(0.50x)" in md
    assert "zswap-lzo: missing on this kernel (zswap not built in)" in md


def test_render_writes_the_report_again_from_a_saved_run(tmp_path: Path) -> None:
    saved = {"machine": "test box", "limit_mib": 64, "missing": {},
             "rounds": {"zram-lzo-rle": rows(usemem_write_s=2.0, return99_s=0.01),
                        "vswapfs": rows(usemem_write_s=1.0, return99_s=0.02)}}
    (tmp_path / "saved.json").write_text(json.dumps(saved))
    bench.render(tmp_path / "saved.json", tmp_path / "out")
    md = (tmp_path / "out" / "bench.md").read_text()
    assert md.startswith("Machine: test box. Limit 64 MiB, workloads 192 MiB, 3 interleaved rounds")
    assert "| usemem write (s) — target ≤ 1.0x zram | 2 ± 0.42 | 1 ± 0.21 (0.50x) |" in md
    # at the sampler's resolution a ratio to zram would mean nothing: none is shown
    back = "| time to give back 99% of it after exit (s, sampled every 20 ms) |"
    assert f"{back} 0.01 ± 0.0021 | 0.02 ± 0.0042 |" in md
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["rounds"] == saved["rounds"]


def test_render_refuses_what_is_not_a_saved_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "other.json").write_text('{"rounds": {}}')
    (tmp_path / "broken.json").write_text("{")
    for path in ("absent.json", "other.json", "broken.json"):
        assert bench.main(["--render", str(tmp_path / path), "--out", str(tmp_path / "out")]) == 2
        assert f"bench: cannot render {tmp_path / path}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_returned_counts_what_came_back_within_the_window() -> None:
    samples = [(0.0, 100), (1.0, 500), (2.0, 500), (2.5, 300), (3.5, 104), (9.0, 100)]
    assert bench.returned(samples, baseline=100, exit_at=2.0, within=2.0) == 99.0
    assert bench.returned(samples, baseline=100, exit_at=2.0, within=0.6) == 50.0
    assert bench.returned([(0.0, 100)], baseline=100, exit_at=0.0) == 100.0


def test_give_back_time_is_when_99_percent_of_the_peak_was_back() -> None:
    samples = [(0.0, 100), (1.0, 500), (2.0, 500), (2.5, 300), (3.5, 104), (9.0, 100)]
    assert bench.give_back_s(samples, baseline=100, exit_at=2.0) == 1.5
    assert bench.give_back_s(samples, baseline=100, exit_at=2.0, share=0.5) == 0.5
    assert bench.give_back_s(samples[:5], baseline=100, exit_at=2.0, share=1.0) is None  # never all
    assert bench.give_back_s([(0.0, 100)], baseline=100, exit_at=0.0) == 0.0


def test_sampled_takes_the_peak_while_the_block_runs_and_what_came_back_after_it() -> None:
    level = {"mem": 100 * MiB, "held": 0}
    b = bench.Backend("sampled", lambda: None, lambda: None, memory=lambda: level["mem"],
                      held=lambda: level["held"])
    with bench.sampled(b, sample_held=True) as mem:
        level.update(mem=300 * MiB, held=500 * MiB)
        time.sleep(0.3)  # the memory sampler looks every 20 ms, the held one every 100 ms
        level["mem"] = 100 * MiB  # all of it given back as the block ends
    assert mem["peak_mem_mib"] == 300.0 and mem["held_mib"] == 500.0
    assert mem["returned_pct"] == 100.0 and 0.0 <= mem["return99_s"] < 0.5


def test_sampled_stops_its_samplers_when_the_block_fails() -> None:
    b = bench.Backend("sampled", lambda: None, lambda: None, memory=lambda: 1)
    with pytest.raises(RuntimeError, match="the workload failed"), bench.sampled(b) as mem:
        raise RuntimeError("the workload failed")
    assert mem == {}  # no figures from a run that did not finish
    assert not [t for t in threading.enumerate() if isinstance(t, bench.Sampler)]


@needs_root
@pytest.mark.parametrize("name", [b.name for b in bench.backends()])
def test_every_backend_comes_up_and_goes_down(name: str) -> None:
    b = next(b for b in bench.backends() if b.name == name)
    assert b.available() is None, f"{name} missing on this machine: {b.available()}"
    before = set(admin.swaps())
    zswap_before = zswap.params()
    with bench.brought_up(b):
        assert len(set(admin.swaps()) - before) == 1
        assert b.memory() >= 0 and b.held() >= 0
        if name.startswith("vswapfs"):  # swapon read the header: the daemon counted it
            assert b.served is not None and b.served()["READ"][0] >= 1
    assert set(admin.swaps()) == before
    assert admin.mounts() == []
    assert zswap.params() == zswap_before  # a backend that set zswap put it back


def test_fuse_stat_deltas_become_the_daemon_rows() -> None:
    before = bench.parse_fuse_stat("LOOKUP 2 0 30 15.0\nREAD 5 20480 100 20.0\n")
    after = bench.parse_fuse_stat("LOOKUP 2 0 30 15.0\nREAD 15 102400 1100 73.3\n"
                                  "WRITE 40 327680 2500000 62500.0\n")
    assert after["WRITE"] == (40, 327680, 2500000)
    assert bench.served_delta(before, after) == {
        "usemem_write_requests": 40.0, "usemem_write_pages_per_request": 2.0,
        "usemem_write_busy_s": 2.5,
        "usemem_read_requests": 10.0, "usemem_read_pages_per_request": 2.0,
        "usemem_read_busy_s": 0.001}
    assert bench.served_delta(after, after)["usemem_write_requests"] == 0.0
    # vswapfs's served() also counts the writes it refused: a row of its own
    refused = {**after, bench.REFUSED: (7, 0, 0)}
    assert bench.served_delta({**before, bench.REFUSED: (2, 0, 0)}, refused)["usemem_write_refused"] == 5.0
    assert "usemem_write_refused" not in bench.served_delta(before, after)
    assert bench.served_delta(before, after, "kv")["kv_read_pages_per_request"] == 2.0
    s = bench.summarize({"zram-lzo-rle": rows(usemem_write_s=2.0),
                         "vswapfs": rows(usemem_write_s=1.0, usemem_write_busy_s=0.5,
                                         usemem_write_requests=17503.0)})
    md = bench.markdown(s, {})
    assert "| usemem: WRITE requests the daemon answered | - | 17,503 ± " in md
    busy = next(line for line in md.splitlines() if "daemon busy on WRITE" in line)
    assert busy.startswith("| usemem: daemon busy on WRITE (s) | - | 0.5 ± ") and "x)" not in busy
    s = bench.summarize({"vswapfs": rows(kv_write_pages_per_request=49.9)})
    assert "| redis: pages per WRITE | 49.9 ± " in bench.markdown(s, {})


def test_the_lz4_variant_gets_its_own_verdicts_when_it_ran() -> None:
    s = bench.summarize({"zram-lzo-rle": rows(usemem_write_s=2.0),
                         "fuse-floor-c": rows(usemem_write_s=3.0),
                         "vswapfs": rows(usemem_write_s=4.5), "vswapfs-lz4": rows(usemem_write_s=3.0)})
    lines = bench.all_verdicts(s)
    at = lines.index("vswapfs-lz4 (--algorithm lz4):")
    assert "vswapfs 1.50x the floor" in lines[0]
    assert "vswapfs-lz4 1.00x the floor" in lines[at + 1]
    del s["vswapfs-lz4"]
    heading = "against the floor (the sustained run's targets):"
    assert bench.all_verdicts(s) == [*bench.verdicts(s), "", heading, *bench.floor_verdicts(s)]


def test_verdicts_compare_with_the_c_floor_when_it_ran() -> None:
    s = bench.summarize({"zram-lzo-rle": rows(usemem_write_s=2.0, swapin_p50_us=10.0, peak_mem_mib=100),
                         "fuse-floor-c": rows(usemem_write_s=3.0, swapin_p50_us=50.0, peak_mem_mib=300),
                         "vswapfs": rows(usemem_write_s=4.5, swapin_p50_us=60.0, peak_mem_mib=90)})
    lines = bench.verdicts(s)
    write = next(line for line in lines if "usemem write" in line)
    assert "the C floor 1.50x zram, vswapfs 1.50x the floor" in write
    assert "floor" in next(line for line in lines if "p50" in line)
    assert "floor" not in next(line for line in lines if "memory at peak" in line)


@needs_root
def test_unknown_backend_is_refused_and_extras_run_only_when_named(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--only", "zram-lzo-rle,nope"]) == 2
    assert "no backend nope" in capsys.readouterr().err
    names = [b.name for b in bench.backends()]
    assert "vswapfs-fastest" in bench.EXTRA and set(bench.EXTRA) <= set(names)
    assert names[-len(bench.EXTRA):] == [n for n in names if n in bench.EXTRA]  # extras last


def test_floor_verdicts_say_how_far_each_sustained_target_is() -> None:
    s = bench.summarize({"zram-lzo-rle": rows(swapin_p99_us=40.0, peak_mem_mib=800),
                         "fuse-floor-c": rows(usemem_write_s=8.0, usemem_verify_s=10.0, kv_rps=10000),
                         "vswapfs": rows(usemem_write_s=9.0, usemem_verify_s=25.0, swapin_p99_us=20.0,
                                         peak_mem_mib=1000, kv_rps=5000)})
    lines = bench.floor_verdicts(s)
    by = {m: next(line for line in lines if bench.METRICS[m][0] in line) for m in
          ("usemem_write_s", "usemem_verify_s", "swapin_p99_us", "peak_mem_mib", "kv_rps")}
    assert by["usemem_write_s"].startswith("MET") and "1.12x the floor" in by["usemem_write_s"]
    assert by["usemem_verify_s"].startswith("MISSED") and "2.50x the floor" in by["usemem_verify_s"]
    assert "100% over it" in by["usemem_verify_s"]
    assert by["swapin_p99_us"].startswith("MET") and "0.50x zram-lzo-rle" in by["swapin_p99_us"]
    assert by["peak_mem_mib"].startswith("MISSED") and "1.25x zram-lzo-rle" in by["peak_mem_mib"]
    assert by["kv_rps"].startswith("MISSED") and "0.50x the floor (target ≥ 0.9x, 44% short of it)" \
        in by["kv_rps"]
    assert not any("p50" in line for line in lines)  # no figure, no verdict
    assert "against the floor" in "\n".join(bench.all_verdicts(s))


def test_the_instruction_counts_phases_serve_every_page_and_read_it_back() -> None:
    bench_requests.serve_phase(40, 2, "verify")  # raises if a page read back differs
    bench_requests.serve_phase(40, 2, "read")
    bench_requests.serve_phase(40, 1, "write")
    with pytest.raises(SystemExit, match="refused"):  # more than one refill holds: said, not miscounted
        bench_requests.serve_phase(400, 32, "write")


def test_a_phase_cpu_time_bounds_its_target_over_the_cpus() -> None:
    s = bench.summarize({"fuse-floor-c": rows(usemem_write_s=3.0, usemem_write_cpu_s=4.5,
                                              kv_rps=30_000.0, kv_get_cpu_s=2.5),
                         "vswapfs": rows(usemem_write_s=6.0, usemem_write_cpu_s=9.0,
                                         kv_rps=20_000.0, kv_get_cpu_s=4.0)})
    # 9 CPU-s on 2 CPUs: no schedule writes faster than 4.5 s, 1.5x the floor's 3 s;
    # the floor kept 1.5 CPUs busy, vswapfs 1.5 too
    write = bench.cpu_bound(s, "vswapfs", "usemem_write_s", "fuse-floor-c", ncpu=2)
    assert write == ("; its CPU time (9.0 CPU-s on 2 CPUs) allows at best 4.50 s, 1.50x the floor "
                     "(CPUs busy: 1.50, the floor 1.50)")
    # 50,000 GETs in 4 CPU-s on 2 CPUs: at best 25,000 a second; 2.5 s for 50,000 at 20,000 a second
    kv = bench.cpu_bound(s, "vswapfs", "kv_rps", "fuse-floor-c", ncpu=2)
    assert "allows at best 25,000 GETs/s, 0.83x the floor (CPUs busy: 1.60, the floor 1.50)" in kv
    assert bench.cpu_bound(s, "vswapfs", "swapin_p50_us", "fuse-floor-c") == ""
    del s["fuse-floor-c"]["usemem_write_cpu_s"]  # a run from before the figure: no bound, no error
    assert bench.cpu_bound(s, "vswapfs", "usemem_write_s", "fuse-floor-c") == ""


def test_the_machine_cpu_time_grows_by_the_work_done() -> None:
    before = linux.cpu_busy_s()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.5:  # half a second on a CPU
        pass
    grown = linux.cpu_busy_s() - before
    # this process's half second, and at most as much on each other CPU meanwhile
    assert 0.45 <= grown < 0.5 * (os.cpu_count() or 1) + 0.1


@needs_root
def test_the_lz4_floor_gives_back_every_kind_of_page(tmp_path: Path) -> None:
    """The floor's --lz4 (the yardstick for a daemon as dense as vswapfs's
    first store) keeps same-filled, compressible and random pages and gives
    each back, rewritten or punched out, byte for byte."""
    page = 4096
    text = (b"the floor keeps what vswapfs's first store keeps " * 90)[:page]
    odd = bytearray(b"\xab" * page)
    odd[-1] = 0  # same-filled but for its last byte: compressed, not kept as a value
    kinds = [bytes(page), b"\xab" * page, text, os.urandom(page), bytes(odd), (7).to_bytes(8, "little") * 512]
    proc, mnt = bench.start_floor(str(tmp_path), 64 * page, lz4=True)
    try:
        fd = os.open(os.path.join(mnt, "swap"), os.O_RDWR)
        try:
            os.pwrite(fd, b"".join(kinds), 8 * page)  # one WRITE of every kind
            assert os.pread(fd, len(kinds) * page, 8 * page) == b"".join(kinds)
            for i, k in enumerate(kinds):
                assert os.pread(fd, page, (8 + i) * page) == k
            os.pwrite(fd, kinds[3] + kinds[2], 8 * page)  # the zero and same-filled pages rewritten
            assert os.pread(fd, 2 * page, 8 * page) == kinds[3] + kinds[2]
            linux.punch_hole(fd, 10 * page, 2 * page)  # what a discard becomes
            assert os.pread(fd, 4 * page, 9 * page) == kinds[2] + bytes(2 * page) + kinds[4]
            held = os.statvfs(mnt)
            assert held.f_blocks - held.f_bfree == 4  # pages 8, 9, 12, 13
        finally:
            os.close(fd)
    finally:
        subprocess.run(["umount", mnt], check=False)
        proc.wait(10)
