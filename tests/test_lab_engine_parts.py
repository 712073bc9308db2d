"""vswapfs_lab.engine_parts: it writes what swap sends on usemem, every part
it times stores pages that read back, and it sees a page that does not.
Nothing here asserts a timing."""

from __future__ import annotations

import json

import pytest

from vswapfs import workload
from vswapfs._consts import PAGE
from vswapfs_lab import engine_parts


def test_the_writes_are_usemems_pages_without_its_zero_ones() -> None:
    text = workload._TEXT
    w = engine_parts.usemem_writes(4, 32)
    assert workload._TEXT is text  # the file corpus did not leak into workload.page
    assert w.slots == 4 * 256
    slots_written: list[int] = []
    workload.use_file_corpus()
    try:
        for first, data in w.runs:
            assert 0 < len(data) <= 32 * PAGE and len(data) % PAGE == 0
            for i in range(len(data) // PAGE):
                assert data[i * PAGE:(i + 1) * PAGE] == workload.page(first + i, 1)
                slots_written.append(first + i)
        nonzero = [i for i in range(w.slots) if workload.page(i, 1) != bytes(PAGE)]
    finally:
        workload._TEXT = text
    assert slots_written == nonzero  # every page the kernel would write, once, in order
    assert w.pages == len(nonzero)
    assert 1.5 < w.pages / len(w.runs) < 3  # about two pages a write, as swap's
    assert all(len(d) == PAGE for _, d in engine_parts.usemem_writes(1, 1).runs)


def test_the_second_workloads_writes_are_as_long_as_allowed() -> None:
    w = engine_parts.usemem_writes(1, 8, "text-random")
    assert w.pages == w.slots  # no zero page: the kernel writes every one
    assert [first for first, _ in w.runs] == list(range(0, w.slots, 8))
    assert b"".join(d for _, d in w.runs) == b"".join(workload.page(i, 1, (0, 1, 1)) for i in range(w.slots))


def test_a_round_times_every_part_and_reads_every_page_back() -> None:
    w = engine_parts.usemem_writes(8, 32)
    secs, bad = engine_parts.one_round(w)
    assert bad == 0
    assert set(secs) == set(engine_parts.PARTS)
    assert all(s > 0 for s in secs.values()), secs


def test_a_page_that_does_not_read_back_is_counted() -> None:
    # Two writes to one slot: reading it back for the first gives the second's
    # page, in each of the three spaces that store them.
    a, b = workload.page(1, 1), workload.page(2, 1)
    assert a != b
    w = engine_parts.Writes([(5, a), (5, b)], pages=2, slots=64)
    _, bad = engine_parts.one_round(w)
    assert bad == 3


@pytest.mark.parametrize("args, says", [
    (["--rounds", "0"], "--rounds must be at least 1, not 0"),
    (["--mib", "-4"], "--mib must be at least 1, not -4"),
    (["--max-pages", "0"], "--max-pages must be at least 1, not 0"),
    (["--pages", "zero"], "argument --pages: invalid choice: 'zero' (choose from 'files', 'text-random')"),
])
def test_bad_options_are_one_clear_line(args: list[str], says: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        engine_parts.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(says)


def test_it_prints_each_part_and_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert engine_parts.main(["--mib", "4", "--rounds", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["bad"] == 0 and result["rounds"] == 1
    assert set(result["us_per_page"]) == {*engine_parts.PARTS, "rest"}
    assert any(line.startswith("| commit |") for line in out)
