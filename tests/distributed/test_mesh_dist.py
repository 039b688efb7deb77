"""SquareMesh on real process groups: coordinates, groups, partners; bad meshes."""

from __future__ import annotations

import functools

import pytest
import torch

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed


def _mesh_worker(rank, world):
    import torch.distributed as dist

    import autocp

    mesh = autocp.init_mesh()
    out = {
        "coord": mesh.coord,
        "p": mesh.p,
        "rank": mesh.rank,
        "row_ranks": mesh.group_ranks("row"),
        "col_ranks": mesh.group_ranks("col"),
        "partner": mesh.transpose_partner,
        "nb": {(a, k): mesh.neighbor(a, k) for a in ("row", "col") for k in (-1, 1, 2, 3)},
        "index": (mesh.index("row"), mesh.index("col")),
    }
    # the groups themselves: sum a rank-dependent value over each group
    for axis in ("row", "col"):
        v = torch.tensor([float(10 ** rank)], dtype=torch.float64)
        dist.all_reduce(v, group=mesh.group(axis))
        out[f"sum_{axis}"] = v.item()
        grp = mesh.group(axis)
        out[f"{axis}_group_members"] = sorted(dist.get_process_group_ranks(grp))
        assert grp is (mesh.row_group if axis == "row" else mesh.col_group)
    # N < p (checked in the same run to save a 9-process start)
    out["few_tokens"] = _too_few_tokens(mesh)
    return out


@functools.lru_cache(maxsize=None)
def _run_3x3():
    return run_distributed(_mesh_worker, 9, timeout=90)


def test_3x3_coordinates_groups_partners():
    res = _run_3x3()
    p = 3
    for rank, o in enumerate(res):
        r, c = divmod(rank, p)
        assert o["p"] == p and o["rank"] == rank
        assert o["coord"] == (r, c), f"rank {rank}: coord {o['coord']}, expected {(r, c)}"
        # "row" = the ranks with the same r
        assert o["row_ranks"] == [p * r + j for j in range(p)]
        assert o["col_ranks"] == [p * i + c for i in range(p)]
        assert o["row_group_members"] == o["row_ranks"]
        assert o["col_group_members"] == o["col_ranks"]
        assert o["sum_row"] == sum(10.0 ** (p * r + j) for j in range(p)), f"rank {rank}: row all_reduce"
        assert o["sum_col"] == sum(10.0 ** (p * i + c) for i in range(p)), f"rank {rank}: col all_reduce"
        assert o["partner"] == p * c + r
        for k in (-1, 1, 2, 3):
            assert o["nb"][("row", k)] == p * r + (c + k) % p
            assert o["nb"][("col", k)] == p * ((r + k) % p) + c
        assert o["index"] == (c, r)
    # every rank is somebody's partner exactly once (an involution)
    partners = [o["partner"] for o in res]
    assert sorted(partners) == list(range(9))
    assert all(partners[partners[i]] == i for i in range(9))


def test_1x1_distributed_mesh():
    (o,) = run_distributed(_mesh_worker, 1, timeout=60)
    assert o["few_tokens"] == [None] * 4  # 2 tokens are plenty for a 1x1 mesh
    assert o["coord"] == (0, 0) and o["p"] == 1 and o["partner"] == 0
    assert o["sum_row"] == 1.0 and o["sum_col"] == 1.0


# ----------------------------------------------------------------------------- bad input
def _catch(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- report type + message to the parent
        return type(e).__name__, str(e)
    return None


def _bad_mesh_worker(rank, world, scenarios):
    """Run each named scenario on this world size and report (type, message) or None."""
    from torch.distributed.device_mesh import init_device_mesh

    import autocp

    table = {
        "init_mesh": lambda: autocp.init_mesh(),
        "init_mesh_p3": lambda: autocp.init_mesh(3),
        "dm_1d": lambda: autocp.SquareMesh(init_device_mesh("cpu", (world,))),
        "dm_1d_from_any": lambda: autocp.SquareMesh.from_any(init_device_mesh("cpu", (world,))),
        "dm_2x4": lambda: autocp.SquareMesh(init_device_mesh("cpu", (2, 4))),
        "dm_1x2": lambda: autocp.SquareMesh.from_any(init_device_mesh("cpu", (1, 2))),
    }
    return {name: _catch(table[name]) for name in scenarios}


def _assert_clear(err, *needles):
    assert err is not None, "expected an error, got none"
    kind, msg = err
    assert kind == "MeshError", err
    for n in needles:
        assert n in msg, f"message lacks {n!r}: {msg}"
    assert "Fix:" in msg, f"message gives no fix: {msg}"


def _check_world_not_square(errs, world):
    lo = int(world ** 0.5)
    # given, required, fix
    _assert_clear(errs["init_mesh"], f"world size {world}", "perfect square", f"launch {lo * lo} or {(lo + 1) ** 2}")


def _check_1d(errs, world):
    for key in ("dm_1d", "dm_1d_from_any"):
        _assert_clear(errs[key], "1D mesh", f"({world},)", "2D square", "init_device_mesh(device_type, (p, p))")


def test_world_size_2_and_1x2_mesh():
    for errs in run_distributed(_bad_mesh_worker, 2, ["init_mesh", "dm_1x2"], timeout=60):
        _check_world_not_square(errs, 2)
        _assert_clear(errs["dm_1x2"], "1 x 2 mesh", "square p x p", "perfect square", "1x1 on 1 ranks or 2x2 on 4")


def test_world_size_3():
    for errs in run_distributed(_bad_mesh_worker, 3, ["init_mesh"], timeout=60):
        _check_world_not_square(errs, 3)


def test_world_size_8_1d_and_2x4_mesh():
    for errs in run_distributed(_bad_mesh_worker, 8, ["init_mesh", "dm_1d", "dm_1d_from_any", "dm_2x4"], timeout=60):
        _check_world_not_square(errs, 8)
        _check_1d(errs, 8)
        _assert_clear(errs["dm_2x4"], "2 x 4 mesh", "square p x p", "perfect square", "2x2 on 4 ranks or 3x3 on 9")


def test_init_mesh_wrong_p_and_1d_mesh_on_4_ranks():
    for errs in run_distributed(_bad_mesh_worker, 4, ["init_mesh_p3", "dm_1d", "dm_1d_from_any"], timeout=60):
        _assert_clear(errs["init_mesh_p3"], "p=3", "needs world size 9", "given world size 4", "pass p=2")
        _check_1d(errs, 4)


def _square_device_mesh_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    import autocp

    m = autocp.SquareMesh.from_any(init_device_mesh("cpu", (2, 2)))
    same = autocp.SquareMesh.from_any(m)
    auto = autocp.SquareMesh.from_any(None)  # builds one from the process group
    return m.coord, same is m, auto.coord, auto.p


def test_from_any_accepts_square_device_mesh():
    res = run_distributed(_square_device_mesh_worker, 4, timeout=60)
    assert res == [((r, c), True, (r, c), 2) for r in range(2) for c in range(2)]


def _too_few_tokens(mesh):
    import autocp

    z = torch.zeros(1, 2, 2, 4)
    return [
        _catch(lambda: autocp.Pair2D().shard(z, mesh)),
        _catch(lambda: autocp.RowToken().shard(torch.zeros(1, 2, 4), mesh)),
        _catch(lambda: autocp.MsaTiles().shard(torch.zeros(1, 5, 2, 4), mesh)),
        _catch(lambda: mesh.check_tokens(2)),
    ]


def test_fewer_tokens_than_mesh_side():
    for o in _run_3x3():
        assert len(o["few_tokens"]) == 4
        for e in o["few_tokens"]:
            _assert_clear(e, "N = 2 tokens", "p=3", "3x3 mesh", "p <= 2", "at least 3 tokens")
