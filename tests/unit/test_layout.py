"""Layouts in one process: every rank's shard computed from its coordinates, block rules,
valid masks, and the error messages for tensors that do not fit a layout."""

from __future__ import annotations

import pytest
import torch

from autocp import ColToken, LayoutError, MeshError, MsaTiles, Pair2D, Replicated, RowToken, SquareMesh
from autocp.layout import block_range, block_size, pad_to, token_valid


def _coord_mesh(p: int, r: int, c: int) -> SquareMesh:
    """A SquareMesh that only knows its coordinates (enough for shard / masks / checks)."""
    m = SquareMesh.single()
    m.p, m.r, m.c = p, r, c
    m._ranks = [[i * p + j for j in range(p)] for i in range(p)]
    return m


def _ref_block(x, dim, t, p):
    """Block t of ``dim`` with the padding rule written out directly (zero pad to ceil(n/p))."""
    n = x.shape[dim]
    b = -(-n // p)
    idx = torch.arange(t * b, (t + 1) * b)
    out_shape = list(x.shape)
    out_shape[dim] = b
    out = x.new_zeros(out_shape)
    ok = idx < n
    src = x.index_select(dim, idx[ok])
    out.index_copy_(dim, torch.arange(b)[ok], src)
    return out


@pytest.mark.parametrize("n,p", [(5, 1), (5, 2), (7, 3), (9, 3), (4, 3), (10, 4)])
def test_block_rules(n, p):
    b = block_size(n, p)
    assert b == -(-n // p)
    covered = []
    for t in range(p):
        lo, hi = block_range(n, p, t)
        assert 0 <= lo <= hi <= n and hi - lo <= b
        covered += list(range(lo, hi))
        v = token_valid(n, p, t)
        assert v.dtype == torch.bool and v.shape == (b,)
        assert int(v.sum()) == hi - lo and bool(v[: hi - lo].all())
    assert covered == list(range(n))  # blocks tile 0..n-1 in order, no overlap


def test_pad_to():
    x = torch.randn(2, 3, 4)
    assert pad_to(x, 1, 3) is x
    y = pad_to(x, 1, 5, value=-1.0)
    assert y.shape == (2, 5, 4) and torch.equal(y[:, :3], x) and bool((y[:, 3:] == -1).all())
    y = pad_to(x, -1, 6)
    assert y.shape == (2, 3, 6) and torch.equal(y[..., :4], x) and bool((y[..., 4:] == 0).all())
    with pytest.raises(ValueError):
        pad_to(x, 1, 2)


CASES = [
    # layout, full shape, which block index feeds each sharded dim ('r' / 'c')
    (Pair2D(), (2, 7, 7, 3)),
    (Pair2D(), (2, 7, 7)),  # a pair mask
    (RowToken(), (2, 7, 3)),
    (ColToken(), (2, 7, 3)),
    (RowToken(), (2, 7)),  # a token mask
    (MsaTiles(), (2, 5, 7, 3)),
    (Replicated(), (2, 7, 3)),
]


@pytest.mark.parametrize("layout,shape", CASES, ids=[f"{l.name}{s}" for l, s in CASES])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_shard_every_coordinate(layout, shape, p):
    full = torch.randn(shape)
    for r in range(p):
        for c in range(p):
            mesh = _coord_mesh(p, r, c)
            local = layout.shard(full, mesh)
            want = full
            for d, a in zip(layout.dims, layout.axes):
                want = _ref_block(want, d, r if a == "r" else c, p)
            assert torch.equal(local, want), f"{layout} p={p} ({r},{c})"
            assert tuple(local.shape) == layout.local_shape(shape, mesh)
            sizes = [shape[d] for d in layout.dims]
            vm = layout.valid_mask(mesh, sizes)
            if isinstance(layout, Replicated):
                assert vm is None
                continue
            # default: max(dims)+1 dims; ndim=local.dim(): broadcastable to the local piece
            assert vm.dim() == max(layout.dims) + 1
            vm_full = layout.valid_mask(mesh, sizes, ndim=local.dim())
            assert vm_full.dim() == local.dim()
            expanded = vm_full.expand(local.shape)  # raises if it does not broadcast
            # padding is zero, and the mask counts exactly the real entries of this piece
            assert bool((local[~expanded] == 0).all())
            n_real = 1
            for d, a in zip(layout.dims, layout.axes):
                lo, hi = block_range(shape[d], p, r if a == "r" else c)
                n_real *= hi - lo
            other = local.numel() // int(torch.tensor([local.shape[d] for d in layout.dims]).prod())
            assert int(expanded.sum()) == n_real * other


def test_valid_mask_marks_padding_3x3():
    mesh = _coord_mesh(3, 2, 1)  # N=7, b=3: block 2 holds token 6 only, block 1 tokens 3..5
    vm = Pair2D().valid_mask(mesh, 7)
    assert vm.shape == (1, 3, 3)
    assert vm[0].tolist() == [[True] * 3, [False] * 3, [False] * 3]
    assert Pair2D().valid_mask(mesh, 7, ndim=4).shape == (1, 3, 3, 1)
    vm = ColToken().valid_mask(mesh, 7)
    assert vm.tolist() == [[True, True, True]]
    # N=4 on 3x3: b=2, the last block is empty (all padding)
    assert RowToken().valid_mask(_coord_mesh(3, 2, 0), 4).tolist() == [[False, False]]


# ----------------------------------------------------------------------------- errors
def test_wrong_tensor_rank_for_layout():
    mesh = _coord_mesh(2, 0, 1)
    with pytest.raises(LayoutError) as e:
        Pair2D().shard(torch.zeros(4, 4), mesh)
    msg = str(e.value)
    assert "(4, 4)" in msg and "2 dims" in msg and "at least 3 dims" in msg and "Fix:" in msg
    with pytest.raises(LayoutError) as e:
        MsaTiles().shard(torch.zeros(3, 4), mesh)
    assert "(3, 4)" in str(e.value) and "Fix:" in str(e.value)


def test_non_square_pair_tensor():
    mesh = _coord_mesh(2, 0, 0)
    with pytest.raises(LayoutError) as e:
        Pair2D().shard(torch.zeros(1, 4, 5, 2), mesh)
    msg = str(e.value)
    assert "(1, 4, 5, 2)" in msg and "4 and 5" in msg and "square" in msg and "Fix:" in msg


def test_wrong_local_tile_shape_for_gather():
    mesh = _coord_mesh(2, 1, 1)
    # N=4 on 2x2 needs b=2; a 3x3 tile would gather padding into the result
    with pytest.raises(LayoutError) as e:
        Pair2D().gather(torch.zeros(1, 3, 3, 2), mesh, 4)
    msg = str(e.value)
    assert "(1, 3, 3, 2)" in msg and "b = ceil(4/2) = 2" in msg and "got 3" in msg and "Fix:" in msg
    with pytest.raises(LayoutError, match="b x b"):
        Pair2D().gather(torch.zeros(1, 2, 3, 2), mesh, 4)
    with pytest.raises(LayoutError) as e:
        MsaTiles().gather(torch.zeros(1, 3, 2, 2), mesh, [5, 4, 1])
    assert "3 global sizes" in str(e.value) and "2 sharded dims" in str(e.value)


def test_tokens_fewer_than_p():
    mesh = _coord_mesh(3, 0, 0)
    with pytest.raises(MeshError) as e:
        Pair2D().shard(torch.zeros(1, 2, 2, 1), mesh)
    msg = str(e.value)
    assert "N = 2" in msg and "p=3" in msg and "Fix:" in msg and "p <= 2" in msg
    with pytest.raises(MeshError):
        RowToken().gather(torch.zeros(1, 1, 4), mesh, 2)


def test_single_mesh_round_trip_is_identity():
    mesh = SquareMesh.single()
    z = torch.randn(2, 5, 5, 3, requires_grad=True)
    local = Pair2D().shard(z, mesh)
    back = Pair2D().gather(local, mesh, 5)
    assert torch.equal(back, z)
    back.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    with pytest.raises(MeshError, match="DeviceMesh"):
        Pair2D().to_dtensor(local, mesh, 5)


def test_layout_equality_and_placements():
    from torch.distributed.tensor import Replicate, Shard

    assert Pair2D() == Pair2D() and Pair2D() != RowToken() and hash(Pair2D()) == hash(Pair2D())
    assert RowToken() != ColToken()
    assert Pair2D().placements() == [Shard(1), Shard(2)]
    assert RowToken().placements() == [Shard(1), Replicate()]
    assert ColToken().placements() == [Replicate(), Shard(1)]
    assert Replicated().placements() == [Replicate(), Replicate()]
    assert MsaTiles().placements() == [Shard(1), Shard(2)]


def test_layout_of_tags_any_token_dim_order():
    """Output tiles in either token-dim order have a layout (and so a DTensor placement); a
    tag tuple no layout describes has none (output='dtensor' refuses it)."""
    from torch.distributed.tensor import Shard

    from autocp.layout import ColToken, MsaTiles, Pair2D, Replicated, RowToken
    from autocp.passes.emit import layout_of_tags

    assert layout_of_tags((None, "r", "c", None)) == Pair2D((1, 2))
    t = layout_of_tags((None, "c", "r", None))  # rank (r, c) holds z[:, T_c, T_r]
    assert t == Pair2D((2, 1)) and t.placements() == [Shard(2), Shard(1)]
    assert layout_of_tags((None, "s", "c", None)) == MsaTiles(1, 2)
    assert layout_of_tags((None, "c", "s")) == MsaTiles(2, 1)
    assert layout_of_tags((None, "r")) == RowToken(1) and layout_of_tags(("c",)) == ColToken(0)
    assert layout_of_tags((None, None)) == Replicated() and layout_of_tags(()) == Replicated()
    assert layout_of_tags((None, "r", "r")) is None and layout_of_tags(None) is None
