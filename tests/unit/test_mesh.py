"""SquareMesh without a process group: the 1x1 mesh, factories, argument checks.
(Real 2x2/3x3 meshes are tested in tests/distributed/test_mesh_dist.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import autocp
from autocp import MeshError, SquareMesh, comm, init_mesh


@pytest.fixture(autouse=True)
def _no_process_group():
    assert not (dist.is_available() and dist.is_initialized()), "a unit test left a process group behind"


def test_single_mesh():
    m = SquareMesh.single()
    assert (m.p, m.coord, m.world_size, m.rank) == (1, (0, 0), 1, 0)
    assert m.transpose_partner == 0
    assert m.neighbor("row", 5) == 0 and m.neighbor("col", -2) == 0
    assert m.group_ranks("row") == [0] and m.group_ranks("col") == [0]
    assert m.group("row") is None and m.row_group is None and m.col_group is None
    assert m.index("row") == 0 and m.index("col") == 0
    assert "p=1" in repr(m)


def test_init_mesh_without_process_group():
    assert init_mesh().p == 1
    assert init_mesh(1).p == 1
    assert SquareMesh.from_any(None).p == 1
    m = SquareMesh.single()
    assert SquareMesh.from_any(m) is m
    with pytest.raises(MeshError) as e:
        init_mesh(2)
    msg = str(e.value)
    assert "p=2" in msg and "4 ranks" in msg and "Fix:" in msg and "init_process_group" in msg


def test_from_any_rejects_other_types():
    with pytest.raises(MeshError) as e:
        SquareMesh.from_any("2x2")
    assert "DeviceMesh or SquareMesh" in str(e.value) and "str" in str(e.value)
    with pytest.raises(MeshError, match="init_mesh"):
        SquareMesh(None)


def test_bad_axis():
    m = SquareMesh.single()
    for fn in (lambda: m.neighbor("diag", 1), lambda: m.group_ranks("rows"), lambda: m.group(1), lambda: m.index("r")):
        with pytest.raises(ValueError, match="'row' or 'col'"):
            fn()


class _FakeDeviceMesh:
    """Duck-typed stand-in: the shape checks run before any process-group call."""

    device_type = "cpu"

    def __init__(self, shape):
        self.mesh = torch.arange(int(torch.tensor(shape).prod())).view(*shape)


@pytest.mark.parametrize("shape", [(4,), (2, 2, 2)])
def test_not_2d_message(shape):
    with pytest.raises(MeshError) as e:
        SquareMesh(_FakeDeviceMesh(shape))
    msg = str(e.value)
    assert f"{len(shape)}D mesh" in msg and str(tuple(shape)) in msg and "Fix:" in msg and "(p, p)" in msg


@pytest.mark.parametrize("shape,near", [((2, 4), "2x2 on 4 ranks or 3x3 on 9"), ((1, 2), "1x1 on 1 ranks or 2x2 on 4"),
                                        ((3, 12), "6x6 on 36 ranks")])
def test_not_square_message(shape, near):
    with pytest.raises(MeshError) as e:
        SquareMesh(_FakeDeviceMesh(shape))
    msg = str(e.value)
    assert f"{shape[0]} x {shape[1]} mesh" in msg and "square p x p" in msg and near in msg and "Fix:" in msg


def test_check_tokens():
    m = SquareMesh.single()
    m.check_tokens(1)
    with pytest.raises(MeshError) as e:
        m.check_tokens(0, "n_tokens")
    assert "n_tokens = 0 tokens" in str(e.value) and "Fix:" in str(e.value)


def test_comm_is_identity_on_single_mesh():
    m = SquareMesh.single()
    x = torch.randn(2, 3, 3, 4, requires_grad=True)
    with comm.count_comm() as st:
        outs = [comm.transpose_exchange(x, m), comm.ring_shift(x, m, "row", 1), comm.ring_shift(x, m, "col", -1),
                comm.all_reduce(x, m, "row"), comm.all_gather_axis(x, m, "col", 1),
                comm.reduce_scatter_axis(x, m, "row", 3)]
    assert all(o is x for o in outs)
    assert st.total_bytes == 0


def test_public_api_names():
    for name in ("SquareMesh", "init_mesh", "MeshError", "Pair2D", "RowToken", "ColToken", "Replicated",
                 "MsaTiles", "Layout", "LayoutError", "MemoryTracker", "comm", "layout"):
        assert hasattr(autocp, name), name
