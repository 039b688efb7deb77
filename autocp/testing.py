"""Run a function on ``world_size`` ranks (one process each) and collect the results.

Built for tests and small benchmarks: gloo on CPU (``file://`` rendezvous, no ports,
``OMP_NUM_THREADS=1``), NCCL on GPUs (rank ``i`` uses ``cuda:i``). Workers are forked
from a *forkserver* that has torch (and autocp) preloaded, so starting 9 ranks costs
well under a second instead of ~10 s of fresh interpreters.

    def work(rank, world, x):          # module-level, picklable
        mesh = autocp.init_mesh()
        return ...

    results = run_distributed(work, 4, x=3)   # list, index = rank

A rank that raises fails the call with that rank's traceback; a rank that hangs past
``timeout`` fails it too. Every worker is killed before the call returns. The report
names the culprit first: a rank that died or raised on its own comes before the ranks
that only lost it ("Connection closed by peer", timeouts, "failed in the previous call").
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as _queue
import tempfile
import time
import traceback
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

__all__ = ["run_distributed", "DistributedTestError", "median_ms"]

_CTX = None
_GRACE_AFTER_FAILURE = 5.0  # seconds the other ranks get to report after one failed


class DistributedTestError(RuntimeError):
    """One or more ranks failed or hung; the message holds their tracebacks, the probable
    culprit first. Attributes: ``errors`` ``{rank: traceback}``, ``hung`` (ranks stopped
    without a result), ``culprit`` (the rank that failed first on its own, or None)."""

    def __init__(self, msg, errors=None, hung=None, culprit=None):
        super().__init__(msg)
        self.errors = dict(errors or {})
        self.hung = list(hung or [])
        self.culprit = culprit


# text of an error that a rank gets because a *peer* failed (not its own cause)
from .guard import PEER_LOSS_MARKERS as _SECONDARY  # noqa: E402


def _culprit_order(errors: dict, order: list) -> list:
    """Ranks in report order: own failures (died without a result, or an error that is not a
    lost-peer / timeout symptom) first, by arrival; then the secondary ones by arrival."""
    own = [r for r in order if r in errors and not any(m in errors[r] for m in _SECONDARY)]
    rest = [r for r in order if r in errors and r not in own]
    return own + rest


def _context():
    global _CTX
    if _CTX is None:
        method = os.environ.get("AUTOCP_MP_START", "forkserver")
        ctx = mp.get_context(method)
        if method == "forkserver":
            # torch._dynamo: DTensor.from_local imports it lazily (~3 s per rank otherwise);
            # boltz: importing it costs ~5 s per rank (it imports torch._dynamo too)
            ctx.set_forkserver_preload(
                ["torch", "torch.distributed", "torch.distributed.device_mesh", "torch.distributed.tensor",
                 "torch._dynamo", "autocp",
                 # the reference model, when installed (a missing module is skipped)
                 "boltz.model.layers.pairformer", "boltz.model.modules.trunkv2",
                 # more, comma-separated, for a caller that imports heavy modules in every rank
                 # (autocp predict: Boltz's data pipeline)
                 *filter(None, os.environ.get("AUTOCP_MP_PRELOAD", "").split(","))]
            )
        _CTX = ctx
    return _CTX


def _report(q, rank, ok, payload) -> None:
    q.put((rank, ok, payload))


def _worker(fn, rank, world, init_file, backend, q, args, kwargs):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    except BaseException:  # noqa: BLE001
        _report(q, rank, False, traceback.format_exc())
        return
    try:
        res = fn(rank, world, *args, **kwargs)
    except BaseException:  # noqa: BLE001
        # Report first and leave without a barrier: the peers may be blocked in a
        # collective this rank never joins, so a barrier here would hang and swallow the
        # traceback. The parent stops the peers.
        _report(q, rank, False, traceback.format_exc())
        return
    try:
        # pickle here, so an unpicklable result is an error of this rank, not a silent
        # drop in the queue's feeder thread (which would look like a hang)
        payload = ForkingPickler.dumps(res)
    except BaseException as e:  # noqa: BLE001
        _report(
            q, rank, False,
            f"the return value of {getattr(fn, '__name__', fn)!s} on rank {rank} ({type(res).__name__}) cannot "
            f"be pickled back to the parent: {type(e).__name__}: {e}. Fix: return plain data "
            f"(numbers, lists, dicts, CPU tensors).",
        )
        return
    # report before the final barrier, so a hang names the rank that hangs, not the
    # ranks that finished and wait for it
    _report(q, rank, True, bytes(payload))
    try:
        dist.barrier()  # no rank tears down its connections while a peer still needs them
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- a peer died; the parent reports it
        pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    backend: str = "gloo",
    timeout: float = 300.0,
    **kwargs,
) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes.

    Returns the per-rank return values (must be picklable; move tensors to CPU).
    Raises :class:`DistributedTestError` naming every rank that raised or hung.
    """
    ctx = _context()
    fd, init_file = tempfile.mkstemp(prefix="autocp_pg_")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it; a stale one would confuse it
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, init_file, backend, q, args, kwargs), daemon=True)
        for r in range(world_size)
    ]
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    order: list = []  # ranks in the order their failure became known
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        dead_since: dict[int, float] = {}
        while len(results) + len(errors) < world_size:
            now = time.monotonic()
            if errors:
                # a failure usually leaves peers blocked in a collective: stop soon
                deadline = min(deadline, now + _GRACE_AFTER_FAILURE)
            left = deadline - now
            if left <= 0:
                break
            try:
                rank, ok, payload = q.get(timeout=min(left, 0.5))
            except _queue.Empty:
                rank = None
            if rank is not None:
                (results if ok else errors)[rank] = payload
                if not ok:
                    order.append(rank)
            # a process that died without reporting (segfault, os._exit, killed): checked on
            # every turn, so a culprit that died is known before its victims' errors pile up
            for r, p in enumerate(procs):
                if r in results or r in errors or p.exitcode is None:
                    continue
                first = dead_since.setdefault(r, now)
                if now - first > 1.0:  # its last message had time to arrive
                    code = p.exitcode
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                    errors[r] = f"process {how} without a result"
                    # it died before its peers noticed: it goes first
                    order.insert(0, r)
    finally:
        if len(results) == world_size:  # all done: let them leave the barrier cleanly
            end = time.monotonic() + 2.0
            for p in procs:
                p.join(timeout=max(0.0, end - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
        q.close()
        if os.path.exists(init_file):
            os.unlink(init_file)
    hung = [r for r in range(world_size) if r not in results and r not in errors]
    if errors or hung:
        name = getattr(fn, "__qualname__", str(fn))
        ranked = _culprit_order(errors, order + [r for r in sorted(errors) if r not in order])
        culprit = ranked[0] if ranked and ranked[0] in errors and not any(
            m in errors[ranked[0]] for m in _SECONDARY) else None
        head = f"{name}: "
        if culprit is not None:
            last = errors[culprit].strip().splitlines()[-1] if errors[culprit].strip() else "?"
            head += f"rank {culprit} failed first ({last}); "
        msg = [head + f"{len(errors)} rank(s) failed, {len(hung)} did not finish "
               f"(world size {world_size}, timeout {timeout}s)"]
        for r in ranked:
            msg.append(f"--- rank {r} ---\n{errors[r]}")
        if hung and errors:
            msg.append(f"--- ranks {hung} were stopped {_GRACE_AFTER_FAILURE}s after the failure above "
                       f"(usually blocked in a collective the failed rank never joined)")
        elif hung:
            msg.append(f"--- ranks {hung} did not finish within {timeout}s (hang or deadlock); stopped")
        raise DistributedTestError("\n".join(msg), errors=errors, hung=hung, culprit=culprit)
    return [pickle.loads(results[r]) for r in range(world_size)]


def median_ms(fn: Callable[[], Any], iters: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after ``warmup`` (benchmarks): CUDA
    events when CUDA is available, ``time.perf_counter`` otherwise."""
    import statistics

    import torch

    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
