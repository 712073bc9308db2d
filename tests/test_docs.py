"""The docs say what the code does: the README's counter table is the engine's,
docs/zswap.md's figure table is what zswap.stats() can return."""

from __future__ import annotations

import re
from pathlib import Path

from vswapfs import zswap
from vswapfs.engine import DESCRIPTIONS

README = Path(__file__).resolve().parent.parent / "README.md"
ZSWAP_DOC = README.parent / "docs" / "zswap.md"


def test_readme_lists_every_counter_with_its_description() -> None:
    text = README.read_text()
    table = text[text.index("| counter | meaning |"):]
    table = table[:table.index("\n\n")]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", table, re.M))
    assert rows == DESCRIPTIONS


def test_zswap_doc_lists_every_zswap_figure_with_its_description() -> None:
    text = ZSWAP_DOC.read_text()
    table = text[text.index("| zswap figure | meaning |"):]
    table = table[:table.index("\n\n")]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", table, re.M))
    assert rows == zswap.DESCRIPTIONS
