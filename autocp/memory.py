"""Per-rank peak memory: live tensor bytes on CPU, ``max_memory_allocated`` on CUDA.

On CPU, RSS and the profiler do not measure what we care about (allocator caching,
fragmentation, python objects). :class:`MemoryTracker` is a ``TorchDispatchMode`` that
sees every tensor an op creates, keys it by its *storage* (views and in-place results
are free), and frees it when the storage dies (weakref finalizer). A DTensor (any
traceable wrapper subclass) counts as the local tensors it wraps: its local bytes, never
its global size. Tensors that existed
before the block (parameters, inputs) are counted by passing them to ``track``.

    with MemoryTracker(track=[*model.parameters(), z]) as mt:
        loss = model(z).sum(); loss.backward()
    mt.peak_bytes, mt.live_bytes
"""

from __future__ import annotations

import weakref
from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

__all__ = ["MemoryTracker", "peak_memory"]


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


def source_line() -> str:
    """``file:line`` of the innermost frame outside torch and autocp (the model's own line),
    else the innermost autocp frame."""
    return _caller()


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and autocp (the model's own line)."""
    import traceback

    stack = traceback.extract_stack()
    for f in reversed(stack):
        if not any(k in f.filename for k in ("/torch/", "/autocp/", "/passes/", "/multiprocessing/", "<")):
            return f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
    inner = [f for f in stack if "/autocp/" in f.filename or "/passes/" in f.filename]
    return f"{inner[-1].filename.rsplit('/', 2)[-2]}/{inner[-1].filename.rsplit('/', 1)[-1]}:{inner[-1].lineno}" if inner else "?"


class MemoryTracker(TorchDispatchMode):
    """Live/peak bytes of tensor storages created inside the block (plus ``track``).

    ``device``: ``"cpu"`` (default) uses the dispatch tracker; ``"cuda"`` resets and
    reads ``torch.cuda.max_memory_allocated`` instead (everything allocated counts).
    CPU only: ``largest_bytes`` / ``largest_what`` -- the largest single storage; ``flag`` --
    a predicate on the shape of each new storage's tensor, matches listed in ``flagged`` as
    ``(shape, dtype, "file:line")`` (the line: the innermost frame outside torch / autocp)
    (e.g. ``lambda s: sum(d == N for d in s) >= 2 or any(d >= N * N for d in s)`` finds whole
    pair tensors).
    """

    def __init__(self, track: Optional[Iterable[torch.Tensor]] = None, device: str = "cpu", flag=None):
        super().__init__()
        self.flag = flag  # optional predicate on a new storage's tensor shape: matches go to ``flagged``
        self.flagged: list = []
        self.device = torch.device(device).type
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0  # the largest single storage seen (CPU tracker)
        self.largest_what = ""  # its shape / dtype
        self._seen: dict[int, object] = {}  # id(storage) -> finalizer
        self._initial = list(track or [])

    # ---------------------------------------------------------------- bookkeeping
    def _free(self, key: int, nbytes: int) -> None:
        self._seen.pop(key, None)
        self.live_bytes -= nbytes

    def track(self, *tensors: torch.Tensor) -> None:
        """Count already-existing tensors (parameters, inputs) as live."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        if _is_fake(t) or t.device.type == "meta":
            return  # a FakeTensor (tracing, autocp.estimate) or a meta tensor allocates nothing
        if is_traceable_wrapper_subclass(t):
            # a DTensor (or any wrapper subclass) owns no storage of its own: count the
            # local tensors it wraps, not its global size
            attrs, _ctx = t.__tensor_flatten__()
            for a in attrs:
                inner = getattr(t, a)
                if isinstance(inner, torch.Tensor):
                    self._add(inner)
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(st)
        if key in self._seen:
            return
        nbytes = st.nbytes()
        self._seen[key] = weakref.finalize(st, self._free, key, nbytes)
        self.live_bytes += nbytes
        if self.flag is not None and self.flag(tuple(t.shape)):
            self.flagged.append((tuple(t.shape), str(t.dtype), _caller()))
        if nbytes > self.largest_bytes:
            self.largest_bytes, self.largest_what = nbytes, f"{tuple(t.shape)} {t.dtype}"
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes

    # ---------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        super().__enter__()
        self.track(*self._initial)
        # keep no strong reference: a tracked tensor freed inside the block must count as freed
        self._initial = []
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            self.live_bytes = torch.cuda.memory_allocated()
            return False
        out = super().__exit__(*exc)
        # stop reacting to frees that happen after the block
        for fin in list(self._seen.values()):
            fin.detach()
        self._seen.clear()
        return out

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def peak_memory(fn, *args, track=(), device: str = "cpu", **kwargs):
    """Run ``fn(*args, **kwargs)`` under a tracker; return ``(result, peak_bytes)``."""
    with MemoryTracker(track=track, device=device) as mt:
        res = fn(*args, **kwargs)
    return res, mt.peak_bytes
