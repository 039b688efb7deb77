"""The square ``p x p`` device mesh that autocp tiles pair tensors over.

Conventions (used everywhere in autocp, tested on 3x3):

* Rank ``(r, c)`` sits at ``device_mesh.mesh[r, c]``. ``r`` indexes mesh *rows*
  (mesh dim 0), ``c`` mesh *columns* (mesh dim 1).
* The **row group** of ``(r, c)`` is the ``p`` ranks with the same ``r``:
  ``{(r, 0), ..., (r, p-1)}``. In DeviceMesh terms this is the group *along mesh
  dim 1* (the dim that varies inside the group) -- the naming that is easy to invert.
* The **column group** is the ``p`` ranks with the same ``c`` (along mesh dim 0).
* The **transpose partner** of ``(r, c)`` is ``(c, r)``.
* A ring shift *along the row* by ``k`` moves data between ``(r, c)`` and
  ``(r, c +- k mod p)``; along the column between ``(r, c)`` and ``(r +- k mod p, c)``.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

__all__ = ["SquareMesh", "init_mesh", "MeshError", "DEFAULT_TIMEOUT_S"]

# seconds an autocp collective may wait for a peer before it fails (instead of hanging);
# ``init_mesh(timeout=...)`` overrides it. See docs/hardening.md.
DEFAULT_TIMEOUT_S = 600.0
# the control group (autocp.guard) waits this much longer than the data collectives, so a
# rank that failed early and retries still meets peers that time out in a data collective
CONTROL_SLACK_S = 5.0  # at most; min(5, timeout / 2) -- see control_group
_P2P_TIMEOUT = [None]  # timedelta for gloo point-to-point waits (gloo's own wait() has none)


def p2p_wait_timeout():
    """The timeout (timedelta) for waiting on a gloo point-to-point transfer, as set by the
    last :func:`init_mesh`; ``None``: wait as the backend does (NCCL, or no init_mesh)."""
    return _P2P_TIMEOUT[0]

ROW = "row"
COL = "col"
AXES = (ROW, COL)


class MeshError(ValueError):
    """A mesh that autocp cannot use; the message says given / required / fix."""


def _isqrt_exact(n: int) -> Optional[int]:
    p = math.isqrt(n)
    return p if p * p == n else None


def check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")
    return axis


@dataclass(frozen=True)
class _Coord:
    r: int
    c: int


class SquareMesh:
    """A square ``p x p`` 2D device mesh with this rank's coordinates and groups.

    Wraps a 2D :class:`torch.distributed.device_mesh.DeviceMesh` (any device type) or,
    for ``p == 1`` without an initialised process group, nothing at all (single
    process; every collective is the identity).
    """

    def __init__(self, device_mesh=None, *, _single: bool = False):
        self.timeout = None  # seconds; set by init_mesh (None: the process groups' own)
        self._control = None
        self._flat = None
        if _single:
            self.device_mesh = None
            self.p = 1
            self.r = self.c = 0
            self._ranks = [[0]]
            self.device_type = "cpu"
            return
        if device_mesh is None:
            raise MeshError("SquareMesh needs a DeviceMesh; use autocp.init_mesh(p) to build one")
        ndim = device_mesh.mesh.ndim
        shape = tuple(device_mesh.mesh.shape)
        if ndim != 2:
            raise MeshError(
                f"autocp needs a 2D square device mesh; given a {ndim}D mesh of shape {shape}. "
                f"Fix: build it as init_device_mesh(device_type, (p, p)) or use autocp.init_mesh(p)."
            )
        if shape[0] != shape[1]:
            n = shape[0] * shape[1]
            lo = math.isqrt(n)
            near = f"{lo}x{lo} on {lo * lo} ranks" + (f" or {lo + 1}x{lo + 1} on {(lo + 1) ** 2}" if lo * lo != n else "")
            raise MeshError(
                f"autocp needs a square p x p mesh; given a {shape[0]} x {shape[1]} mesh ({n} ranks). "
                f"Fix: use a world size that is a perfect square (1, 4, 9, 16, ...) and mesh shape "
                f"(p, p), e.g. {near}: init_device_mesh(device_type, (p, p)) or autocp.init_mesh()."
            )
        self.device_mesh = device_mesh
        self.p = shape[0]
        self.device_type = device_mesh.device_type
        self._ranks = device_mesh.mesh.tolist()
        me = dist.get_rank()
        for r, row in enumerate(self._ranks):
            for c, rank in enumerate(row):
                if rank == me:
                    self.r, self.c = r, c
                    break
            else:
                continue
            break
        else:
            raise MeshError(
                f"this process (global rank {me}) is not in the given mesh {self._ranks}. "
                f"Fix: build the SquareMesh only on the ranks of its DeviceMesh."
            )

    # ------------------------------------------------------------------ factories
    @classmethod
    def single(cls) -> "SquareMesh":
        """A 1x1 mesh that needs no process group."""
        return cls(_single=True)

    @classmethod
    def simulated(cls, p: int, coord=(0, 0)) -> "SquareMesh":
        """A ``p x p`` mesh seen from rank ``coord`` without any process group (global
        rank of ``(r, c)`` is ``r * p + c``). Only for runs under
        :func:`autocp.comm.simulate` (the estimator's FakeTensor runs of the real tile
        programs): a collective on it outside that context raises."""
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise MeshError(f"SquareMesh.simulated: given p={p!r}; required a positive int.")
        r, c = (int(x) for x in coord)
        if not (0 <= r < p and 0 <= c < p):
            raise MeshError(f"SquareMesh.simulated: given coord={tuple(coord)}; required 0 <= r, c < p={p}.")
        m = cls(_single=True)
        m.p, m.r, m.c = p, r, c
        m._ranks = [[i * p + j for j in range(p)] for i in range(p)]
        m.is_simulated = True
        return m

    is_simulated = False

    @classmethod
    def from_any(cls, mesh) -> "SquareMesh":
        """Accept a SquareMesh, a 2D DeviceMesh, or None (1x1 when not distributed)."""
        if isinstance(mesh, SquareMesh):
            return mesh
        if mesh is None:
            # init_mesh: the default group's mesh, or 1x1 -- and it refuses a silent 1x1 per
            # process under a launcher (WORLD_SIZE > 1 set, no process group)
            return init_mesh()
        from torch.distributed.device_mesh import DeviceMesh

        if isinstance(mesh, DeviceMesh):
            return cls(mesh)
        raise MeshError(f"expected a DeviceMesh or SquareMesh, got {type(mesh).__name__}")

    # ------------------------------------------------------------------ coordinates
    @property
    def coord(self) -> tuple[int, int]:
        """This rank's ``(r, c)``."""
        return (self.r, self.c)

    @property
    def world_size(self) -> int:
        return self.p * self.p

    def rank_of(self, r: int, c: int) -> int:
        """Global rank of mesh position ``(r mod p, c mod p)``."""
        return self._ranks[r % self.p][c % self.p]

    @property
    def rank(self) -> int:
        return self.rank_of(self.r, self.c)

    @property
    def transpose_partner(self) -> int:
        """Global rank of ``(c, r)``."""
        return self.rank_of(self.c, self.r)

    def neighbor(self, axis: str, k: int) -> int:
        """Global rank ``k`` steps along ``axis``: ``(r, c+k)`` for 'row', ``(r+k, c)`` for 'col'."""
        check_axis(axis)
        if axis == ROW:
            return self.rank_of(self.r, self.c + k)
        return self.rank_of(self.r + k, self.c)

    def index(self, axis: str) -> int:
        """This rank's position inside its ``axis`` group: ``c`` for 'row', ``r`` for 'col'."""
        return self.c if check_axis(axis) == ROW else self.r

    def group_ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's row group (same r) or column group (same c)."""
        if check_axis(axis) == ROW:
            return list(self._ranks[self.r])
        return [self._ranks[r][self.c] for r in range(self.p)]

    def group(self, axis: str):
        """The process group of this rank's row (same r) or column (same c)."""
        check_axis(axis)
        if self.device_mesh is None:
            return None
        # the row group varies c, i.e. runs along mesh dim 1
        return self.device_mesh.get_group(1 if axis == ROW else 0)

    def group_order(self, axis: str) -> list[int]:
        """Mesh index (``c`` for 'row', ``r`` for 'col') of each member of the ``axis``
        group, in the group's own rank order.

        Collectives return results in group-rank order, which is the global-rank order and
        not the mesh order when the DeviceMesh lists its ranks permuted (e.g.
        ``[[3, 2], [1, 0]]``). :mod:`autocp.comm` uses this to put blocks in mesh order.
        """
        check_axis(axis)
        if self.device_mesh is None or self.p == 1:
            return list(range(self.p))
        cache = self.__dict__.setdefault("_group_order", {})
        if axis not in cache:
            members = self.group_ranks(axis)
            cache[axis] = [members.index(g) for g in dist.get_process_group_ranks(self.group(axis))]
        return list(cache[axis])

    @property
    def ranks(self) -> list:
        """Global ranks of the mesh, ``ranks[r][c]`` (a copy)."""
        return [list(row) for row in self._ranks]

    @property
    def ranks_flat(self) -> list:
        """Global ranks of the mesh in row-major order (mesh rank index -> global rank)."""
        return [r for row in self._ranks for r in row]

    def control_group(self):
        """A process group over all mesh ranks used only by :mod:`autocp.guard` (agreement
        checks, failure reports), so its collectives stay in step even after a failed
        forward left the row/column groups out of step. ``None`` on a 1x1 mesh."""
        if self.device_mesh is None or self.p == 1:
            return None
        if self._control is None:
            ranks = sorted(r for row in self._ranks for r in row)
            kw = {}
            if self.timeout is not None:
                kw["timeout"] = datetime.timedelta(seconds=self.timeout + min(CONTROL_SLACK_S, self.timeout / 2))
            if len(ranks) == dist.get_world_size():
                self._control = dist.new_group(ranks=ranks, backend="gloo", **kw)
            else:
                self._control = dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=True, **kw)
        return self._control

    def flat_group(self):
        """A process group over all ``p*p`` mesh ranks (the mesh's own backend) for the
        collectives of tensors split over the whole mesh (atom windows,
        :mod:`autocp.ops.atom_windows`); members in ascending global rank (see
        :meth:`flat_order`). ``None`` on a 1x1 mesh. Created on first use by every mesh rank."""
        if self.device_mesh is None or self.p == 1:
            return None
        if self._flat is None:
            ranks = sorted(self.ranks_flat)
            if len(ranks) == dist.get_world_size():
                self._flat = dist.new_group(ranks=ranks)
            else:
                self._flat = dist.new_group(ranks=ranks, use_local_synchronization=True)
        return self._flat

    def flat_order(self) -> list:
        """Mesh position ``(r, c)`` of each member of :meth:`flat_group`, in group-rank order."""
        pos = {self.rank_of(r, c): (r, c) for r in range(self.p) for c in range(self.p)}
        return [pos[g] for g in sorted(pos)]

    @property
    def row_group(self):
        return self.group(ROW)

    @property
    def col_group(self):
        return self.group(COL)

    # ------------------------------------------------------------------ checks
    def check_tokens(self, n: int, what: str = "N") -> None:
        """Raise when a token length is too small for this mesh (each block needs a token)."""
        if n < self.p:
            q = max(n, 1)
            raise MeshError(
                f"{what} = {n} tokens is smaller than the mesh side p={self.p} "
                f"({self.p}x{self.p} mesh): every mesh row/column needs at least one token "
                f"(N >= p). Fix: use a mesh with p <= {q} (at most {q}x{q} = {q * q} ranks) "
                f"or an input with at least {self.p} tokens."
            )

    def __repr__(self) -> str:
        return f"SquareMesh(p={self.p}, coord=({self.r}, {self.c}), device_type={self.device_type!r})"


def _timeout_s(timeout) -> float:
    if timeout is None:
        return DEFAULT_TIMEOUT_S
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise MeshError(
            f"init_mesh: given timeout={timeout!r}; required a positive number of seconds or a timedelta. "
            f"Fix: init_mesh(timeout=120)."
        )
    return float(timeout)


def _env_world() -> Optional[int]:
    w = os.environ.get("WORLD_SIZE")
    if w is None:
        return None
    try:
        return int(w)
    except ValueError:
        raise MeshError(f"WORLD_SIZE={w!r} is set but is not an integer. Fix: unset it or set it to the number "
                        f"of processes.") from None


def _init_from_env(world: int, device_type: Optional[str], timeout_s: float) -> None:
    """``init_process_group("env://")`` as torchrun would need it; raise when the launcher's
    variables are incomplete (never a silent 1x1 mesh on each of ``world`` processes)."""
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise MeshError(
            f"init_mesh: WORLD_SIZE={world} is set but no process group is initialised and {missing} "
            f"{'is' if len(missing) == 1 else 'are'} not set, so the {world} processes cannot find each other "
            f"(each would get its own 1x1 mesh). Fix: launch with torchrun (it sets RANK, MASTER_ADDR, MASTER_PORT) "
            f"or call torch.distributed.init_process_group(...) before autocp.init_mesh()."
        )
    import torch

    use_cuda = device_type == "cuda" or (device_type is None and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])) % torch.cuda.device_count())
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))


def _set_timeout(group, timeout_s: float) -> None:
    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout
    except ImportError:  # older torch: the groups keep their own timeout
        return
    try:
        _set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)
    except Exception:  # noqa: BLE001 -- a backend without settable timeouts keeps its own
        pass


def init_mesh(p: Optional[int] = None, device_type: Optional[str] = None, *, timeout=None) -> SquareMesh:
    """Build a square mesh from the current (default) process group.

    ``p`` defaults to ``sqrt(world_size)``; ``device_type`` defaults to ``"cuda"`` when
    the backend is NCCL, else ``"cpu"``. Without an initialised process group and
    ``p in (None, 1)`` this returns a single-process 1x1 mesh -- unless a launcher set
    ``WORLD_SIZE > 1`` (torchrun): then it initialises the process group from the
    environment (``env://``), or raises saying what is missing.

    ``timeout`` (seconds or timedelta, default :data:`DEFAULT_TIMEOUT_S`): how long any
    autocp collective (row/column groups, point-to-point on the default group, the
    agreement checks of :mod:`autocp.guard`) waits for a peer before it fails with an
    error instead of hanging. It is applied to the default group too (autocp's
    point-to-point exchanges run there).
    """
    timeout_s = _timeout_s(timeout)
    if not (dist.is_available() and dist.is_initialized()):
        world_env = _env_world()
        if world_env is not None and world_env > 1:
            _init_from_env(world_env, device_type, timeout_s)
        elif p in (None, 1):
            return SquareMesh.single()
        else:
            raise MeshError(
                f"init_mesh(p={p}) needs an initialised process group with {p * p} ranks; none is. "
                f"Fix: call torch.distributed.init_process_group(...) first (torchrun does it)."
            )
    world = dist.get_world_size()
    q = _isqrt_exact(world)
    if q is None:
        lo = math.isqrt(world)
        raise MeshError(
            f"world size {world} is not a perfect square; autocp needs a p x p mesh "
            f"(1, 4, 9, 16, ... ranks). Fix: launch {lo * lo} or {(lo + 1) ** 2} processes."
        )
    if p is None:
        p = q
    if p * p != world:
        raise MeshError(
            f"init_mesh(p={p}) needs world size {p * p}; given world size {world}. "
            f"Fix: pass p={q} or launch {p * p} processes."
        )
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    from torch.distributed.device_mesh import init_device_mesh

    dm = init_device_mesh(device_type, (p, p), mesh_dim_names=("cp_r", "cp_c"))
    mesh = SquareMesh(dm)
    mesh.timeout = timeout_s
    if p > 1:
        _P2P_TIMEOUT[0] = datetime.timedelta(seconds=timeout_s) if dist.get_backend() == "gloo" else None
        _set_timeout(None, timeout_s)
        for dim in (0, 1):
            _set_timeout(dm.get_group(dim), timeout_s)
        mesh.control_group()  # every rank calls init_mesh: create it collectively now
    return mesh
