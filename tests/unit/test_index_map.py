"""``IndexMap``: one-hot maps held as indices answer bmm / sum / casts / repeat_interleave
exactly as the dense map does; anything else builds the dense tile (warned; refused in
strict mode); a tensor that is not one-hot is never turned into one."""

import warnings

import pytest
import torch

from autocp.mesh import SquareMesh
from autocp.passes.context import tile_context
from autocp.passes.eager import EagerShardingError, strict_mode
from autocp.passes.index_map import IndexMap, index_map_of


def _dense(b=2, r=7, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, k, (b, r), generator=g)  # -1: an all-zero row
    d = torch.zeros(b, r, k, dtype=torch.int64)
    for i in range(b):
        for j in range(r):
            if idx[i, j] >= 0:
                d[i, j, idx[i, j]] = 1
    return d


@pytest.fixture
def ctx():
    with tile_context(SquareMesh.single(), 7):
        yield


def test_calls_match_the_dense_map(ctx):
    d = _dense()
    m = index_map_of(d, (None, None, None))
    assert isinstance(m, IndexMap) and m.shape == d.shape and m.dtype == d.dtype
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(torch.bmm(m.float(), x), torch.bmm(d.float(), x))
    torch.testing.assert_close(m.float() @ x, d.float() @ x)
    torch.testing.assert_close(torch.bmm(m.repeat_interleave(3, 0).float(), x.repeat_interleave(3, 0)),
                               torch.bmm(d.repeat_interleave(3, 0).float(), x.repeat_interleave(3, 0)))
    for dim in (1, 2, -1):
        assert torch.equal(m.sum(dim), d.sum(dim)), dim
    assert torch.equal(m.float().sum(1), d.float().sum(1))
    assert m.to(torch.float32).dtype == torch.float32 and m.long().dtype == torch.int64


def test_bmm_follows_autocast(ctx):
    d = _dense()
    m = index_map_of(d, (None, None, None))
    x = torch.randn(2, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.bmm(d.float(), x)
        got = torch.bmm(m.float(), x)
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_other_calls_build_the_dense_tile(ctx):
    d = _dense()
    m = index_map_of(d, (None, None, None))
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        got = m * 2
    assert torch.equal(got, d * 2)
    assert any("dense tile" in str(w.message) for w in wl)
    with strict_mode(True), pytest.raises(EagerShardingError, match="one-hot map"):
        m * 2


def test_not_one_hot_is_kept_dense():
    d = _dense().float()
    d[0, 0, :2] = 1  # two ones in a row
    assert index_map_of(d, (None, None, None)) is None
    d = _dense().float()
    d[d != 0] = 0.5  # not a 0/1 map
    assert index_map_of(d, (None, None, None)) is None
