"""Unpadded evaluation under DDP: each rank's rows, counts that differ by one, rows gathered back whole.

The 2-process end-to-end check (301 rows, figures and predictions equal to one process) is in test_ddp.py.
"""

from __future__ import annotations

import pytest

from layerfusion.data.datamodule import UnpaddedSampler
from layerfusion.data.readers import DataError


@pytest.mark.parametrize("rows,world", [(301, 2), (7, 3), (8, 8), (1821, 8)])
def test_unpadded_sampler_gives_every_row_to_exactly_one_rank(rows, world):
    dataset = list(range(rows))
    shares = [list(UnpaddedSampler(dataset, world, r)) for r in range(world)]
    assert sorted(i for share in shares for i in share) == dataset  # every row once, none repeated
    assert [len(UnpaddedSampler(dataset, world, r)) for r in range(world)] == list(map(len, shares))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(share == sorted(share) for share in shares)


def test_unpadded_sampler_needs_a_row_per_rank():
    with pytest.raises(DataError, match="1 row.*2 processes"):
        UnpaddedSampler([0], 2, 0)
