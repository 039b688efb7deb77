"""Automatic, bucketed gradient reduction for a :class:`ParallelModule` (DDP-style).

Every autocp op leaves *partial* parameter gradients: the sum over the ``P = p*p`` ranks
of the mesh is the single-device gradient. :class:`GradReducer` makes ``.grad`` complete
after ``loss.backward()`` without any extra call:

* a tensor hook on each parameter scales the *new* gradient by ``P`` before it is
  accumulated, so ``.grad`` holds ``P * partial`` and the true gradient is the **mean**
  over the ranks (DDP's convention). Gradients accumulated earlier (already synced, or
  accumulated under :meth:`no_sync`) stay correct: the mean of identical values is the
  value, and the mean of accumulated ``P * partial`` is the accumulated full gradient;
* parameters are packed into flat buckets of about ``bucket_bytes`` in reverse
  registration order (roughly the order backward produces them); when every gradient of a
  bucket has been accumulated (post-accumulate-grad hook) the bucket is flattened and an
  **async** all-reduce is launched, overlapping the rest of backward;
* a callback queued on the running backward (from a hook on the module's outputs, i.e.
  in the outermost graph task, so re-entrant checkpoints inside the model do not end it
  early) launches the remaining buckets, waits, and writes the mean back into ``.grad``;
* data parallel: with ``dp`` replicas of the mesh, the reduction group is the union of
  all replicas (``dp * P`` ranks, the world group when that is the world) and one fused
  mean gives "summed over the CP mesh, averaged over dp".
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

from . import comm

__all__ = ["GradReducer", "GradSyncError", "GradSyncMixin"]


class GradSyncError(RuntimeError):
    pass


class _Bucket:
    def __init__(self, params):
        self.params = params
        self.ready = set()
        self.flat = None
        self.work = None


class GradReducer:
    """Reduce the partial gradients of ``params`` over ``group`` (``group_size`` ranks).

    ``cp_size``: ranks of one CP mesh (``p*p``), the factor the new gradients are scaled by.
    ``group``: process group of all ranks that share these parameters (CP mesh times dp
    replicas); ``None`` = the default (world) group.
    """

    def __init__(self, params, cp_size: int, group=None, group_size: Optional[int] = None,
                 bucket_bytes: int = 25 * 2**20):
        if bucket_bytes <= 0:
            raise ValueError(f"grad_bucket_mb: given {bucket_bytes} bytes; required > 0. Fix: e.g. grad_bucket_mb=25.")
        seen, plist = set(), []
        for prm in params:
            if prm.requires_grad and id(prm) not in seen:
                seen.add(id(prm))
                plist.append(prm)
        self.params = plist
        self.cp_size = int(cp_size)
        self.group = group
        self.group_size = int(group_size if group_size is not None else
                              (dist.get_world_size(group) if dist.is_initialized() else 1))
        if group is None and self.group_size > 1 and dist.get_world_size() != self.group_size:
            raise GradSyncError(
                f"GradReducer: given group=None (the world, {dist.get_world_size()} ranks) for {self.group_size} "
                f"ranks sharing the parameters; required a group of exactly those ranks. Fix: pass group=.")
        self.bucket_bytes = int(bucket_bytes)
        self.enabled = self.group_size > 1
        self.sync_on = True          # False inside no_sync()
        self.pending = False         # unreduced (scaled) gradients are in .grad
        self._queued = False
        self._armed = False
        self.last_stats = {"collectives": 0, "bytes": 0, "buckets": 0}
        self.buckets = []
        cur, size, key = [], 0, None
        for prm in reversed(plist):
            k = (prm.dtype, prm.device)
            nb = prm.numel() * prm.element_size()
            if cur and (k != key or size + nb > self.bucket_bytes):
                self.buckets.append(_Bucket(cur))
                cur, size = [], 0
            cur.append(prm)
            size += nb
            key = k
        if cur:
            self.buckets.append(_Bucket(cur))
        self._where = {id(p): b for b in self.buckets for p in b.params}
        self._handles = []
        if self.enabled:
            for prm in plist:
                self._handles.append(prm.register_hook(self._scale_hook))
                self._handles.append(prm.register_post_accumulate_grad_hook(self._ready_hook))

    # ------------------------------------------------------------------ hooks
    def _scale_hook(self, g):
        # only in a backward through this module's outputs (the parameters are shared with
        # the original model, whose own backward must stay untouched)
        if not self._armed:
            return g
        self.pending = True
        return g * self.cp_size if self.cp_size != 1 else g

    def _ready_hook(self, prm):
        if not (self.sync_on and self._queued):
            return
        b = self._where[id(prm)]
        b.ready.add(id(prm))
        if len(b.ready) == len(b.params) and b.work is None:
            self._launch(b)

    def attach_output(self, out) -> None:
        """Called by the module's forward on its output tensors: queue the end-of-backward
        reduction from the outermost graph task running backward."""
        if not self.enabled:
            return
        for t in out:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self._output_hook)

    def _output_hook(self, g):
        if not self._armed:
            self._armed = True
            self._queued = self.sync_on
            if self.sync_on:
                self.reset_stats()  # last_stats: this backward's reduction
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        return g

    # ------------------------------------------------------------------ reduction
    def _launch(self, b: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        b.flat = torch.cat([g.reshape(-1) for g in grads])
        n = self.group_size
        comm.STATS.add("grad_sync", 2 * (n - 1) * b.flat.numel() * b.flat.element_size() // n)
        self.last_stats["collectives"] += 1
        self.last_stats["bytes"] += b.flat.numel() * b.flat.element_size()
        if isinstance(self.group, (list, tuple)):  # reduce over several groups in turn
            for g in self.group[:-1]:
                dist.all_reduce(b.flat, group=g)
                self.last_stats["collectives"] += 1
            b.work = dist.all_reduce(b.flat, group=self.group[-1], async_op=True)
        else:
            b.work = dist.all_reduce(b.flat, group=self.group, async_op=True)

    def _finish(self) -> None:
        self._armed = False
        if self._queued:
            self.reduce_now()

    def reduce_now(self) -> None:
        """Launch every bucket not yet launched, wait, write the mean into ``.grad``."""
        self._queued = False
        if not self.enabled:
            return
        self.last_stats = dict(self.last_stats, buckets=len(self.buckets))
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        for b in self.buckets:
            b.work.wait()
            b.flat.div_(self.group_size)
            off = 0
            for p in b.params:
                k = p.numel()
                if p.grad is not None:
                    p.grad.copy_(b.flat[off:off + k].view_as(p.grad))
                off += k
            b.flat, b.work = None, None
            b.ready.clear()
        self.pending = False

    def reset_stats(self) -> None:
        self.last_stats = {"collectives": 0, "bytes": 0, "buckets": 0}

    @contextlib.contextmanager
    def no_sync(self):
        """Skip the reduction for the backwards inside the block (gradient accumulation);
        the first backward after the block reduces everything accumulated."""
        if not self.sync_on:
            raise GradSyncError(
                "no_sync: given a nested `with pm.no_sync():`; required one level. Fix: remove the inner no_sync.")
        if self._queued:
            raise GradSyncError(
                "no_sync: entered while a backward of this module is running; required outside backward. "
                "Fix: enter no_sync around forward and backward of the micro-batches to accumulate.")
        self.sync_on = False
        try:
            yield
        finally:
            self.sync_on = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.enabled = False


class GradSyncMixin:
    """``enable_grad_sync`` / ``no_sync`` for a parallel module with a ``mesh`` (a
    :class:`~autocp.mesh.SquareMesh`): what :func:`autocp.parallelize` attaches to blocks and
    whole models alike. The module's forward calls ``self.grad_reducer.attach_output(...)``
    on its outputs."""

    grad_reducer = None

    def enable_grad_sync(self, bucket_mb: float = 25.0, dp_size: int = 1, group=None) -> None:
        """Reduce the partial gradients automatically at the end of every backward."""
        if self.grad_reducer is not None:
            self.grad_reducer.remove()
        P = self.mesh.p * self.mesh.p
        self.grad_reducer = GradReducer(self.parameters(), P, group=group, group_size=P * dp_size,
                                        bucket_bytes=int(bucket_mb * 2**20))

    def no_sync(self):
        """Like ``DDP.no_sync``: backwards inside accumulate unreduced gradients; the first
        synced backward afterwards reduces all of them."""
        return self.grad_reducer.no_sync() if self.grad_reducer is not None else contextlib.nullcontext()
