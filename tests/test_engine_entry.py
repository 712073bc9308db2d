"""The virtual_table entry word: every encoding round-trips."""

from hypothesis import given
from hypothesis import strategies as st

from vswapfs.engine import entry as E


@given(st.integers(0, (1 << 64) - 1))
def test_same_word_round_trips_or_declines(value: int) -> None:
    word = E.same_word(value)
    if word is None:
        return
    assert E.tag(word) == E.SAME
    assert E.same_value(word) == value
    assert E.same_page(word) == value.to_bytes(8, "little") * 512


def test_same_word_covers_common_fills() -> None:
    for value in (0, 1, (1 << 64) - 1, (1 << 64) - 2, 0xAAAAAAAAAAAAAAAA, 0x0101010101010101,
                  0x00007F0012345678, 0xDEADBEEFDEADBEEF):
        assert E.same_word(value) is not None, hex(value)
    assert E.same_word(0xF000000000000001) is None


@given(st.integers(0, E.MAX_POOL_OBJECT), st.integers(1, 4096))
def test_pool_word_round_trips(obj: int, length: int) -> None:
    word = E.pool_word(obj, length)
    assert E.tag(word) == E.POOL
    assert (E.pool_object(word), E.pool_length(word)) == (obj, length)
    assert word < 1 << 64


@given(st.integers(0, E.MAX_BACKING_FILES - 1), st.integers(0, E.MAX_PHYS_SLOT))
def test_phys_word_round_trips(index: int, pslot: int) -> None:
    word = E.phys_word(index, pslot)
    assert E.tag(word) == E.PHYS
    assert (E.phys_file(word), E.phys_slot(word)) == (index, pslot)
    assert word < 1 << 64
