"""The README says what the code does: its counter table is the engine's."""

from __future__ import annotations

import re
from pathlib import Path

from vswapfs import zswap
from vswapfs.engine import DESCRIPTIONS

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_lists_every_counter_with_its_description() -> None:
    text = README.read_text()
    table = text[text.index("| counter | meaning |"):]
    table = table[:table.index("\n\n")]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", table, re.M))
    assert rows == DESCRIPTIONS


def test_readme_lists_every_zswap_figure_with_its_description() -> None:
    text = README.read_text()
    table = text[text.index("| zswap figure | meaning |"):]
    table = table[:table.index("\n\n")]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", table, re.M))
    assert rows == zswap.DESCRIPTIONS
