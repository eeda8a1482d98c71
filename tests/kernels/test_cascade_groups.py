"""shared_prefix_groups: which one-token rows cascade attention groups, from their block tables."""

from __future__ import annotations

from batchgen.sched.output import shared_prefix_groups


def _groups(tables, ctx, **kw):
    rows, starts, blocks = shared_prefix_groups(tables, ctx, 16, **kw)
    return sorted((sorted(rows[a:b]), n) for a, b, n in zip(starts, starts[1:], blocks))


def test_rows_group_by_their_common_leading_blocks():
    a, b, c = [1, 2, 3, 4, 5, 90], [1, 2, 3, 4, 5, 91], [1, 2, 3, 4, 9, 92]
    d, e = [7, 8, 9, 10, 11, 12], [7, 8, 9, 10, 11, 13]
    lone = [20, 21, 22, 23, 24, 25]
    assert _groups([a, d, lone, b, e, c], [90] * 6) == [([0, 3, 5], 4), ([1, 4], 5)]


def test_a_row_keeps_the_block_of_its_last_token():
    """ctx 65 = 4 full blocks + 1 token: 4 may be shared; ctx 64: only 3 (the 4th holds the query)."""
    t = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]]
    assert _groups(t, [65, 65]) == [([0, 1], 4)]
    assert _groups(t, [64, 65]) == []  # 3 < min_blocks
    assert _groups(t, [64, 65], min_blocks=3) == [([0, 1], 3)]


def test_too_few_rows_or_blocks_make_no_group():
    assert _groups([[1, 2, 3, 4, 5]], [90]) == []
    assert _groups([[1, 2, 3, 9, 5], [1, 2, 3, 8, 5]], [90, 90]) == []  # 3 shared blocks < 4
    assert _groups([[1, 2, 3, 4, 5]] * 3, [90] * 3, min_rows=4) == []
    assert _groups([], []) == []
