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
``timeout`` fails it too. Every worker is killed before the call returns.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as _queue
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

__all__ = ["run_distributed", "DistributedTestError"]

_CTX = None


class DistributedTestError(RuntimeError):
    """One or more ranks failed or hung; the message holds their tracebacks."""


def _context():
    global _CTX
    if _CTX is None:
        method = os.environ.get("AUTOCP_MP_START", "forkserver")
        ctx = mp.get_context(method)
        if method == "forkserver":
            # torch._dynamo: DTensor.from_local imports it lazily (~3 s per rank otherwise)
            ctx.set_forkserver_preload(
                ["torch", "torch.distributed", "torch.distributed.device_mesh", "torch.distributed.tensor",
                 "torch._dynamo", "autocp"]
            )
        _CTX = ctx
    return _CTX


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
        try:
            res = fn(rank, world, *args, **kwargs)
        finally:
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 -- a peer died; the parent reports it
                pass
            dist.destroy_process_group()
        q.put((rank, True, res))
    except BaseException:  # noqa: BLE001
        q.put((rank, False, traceback.format_exc()))


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
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, payload = q.get(timeout=min(left, 1.0))
            except _queue.Empty:
                # a process that died without reporting (segfault, os._exit)
                for r, p in enumerate(procs):
                    if r not in results and r not in errors and p.exitcode not in (None, 0):
                        # give its queue message a moment to arrive
                        try:
                            rank, ok, payload = q.get(timeout=0.5)
                            (results if ok else errors)[rank] = payload
                        except _queue.Empty:
                            errors[r] = f"process exited with code {p.exitcode} without a result"
                continue
            (results if ok else errors)[rank] = payload
            if errors:
                # a failure usually makes peers hang in a collective: stop waiting soon
                deadline = min(deadline, time.monotonic() + 5.0)
    finally:
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
        msg = [f"{len(errors)} rank(s) failed, {len(hung)} hung (world size {world_size}, timeout {timeout}s)"]
        for r in sorted(errors):
            msg.append(f"--- rank {r} ---\n{errors[r]}")
        if hung:
            msg.append(f"--- ranks {hung} did not finish within {timeout}s (or were stopped after a failure)")
        raise DistributedTestError("\n".join(msg))
    return [results[r] for r in range(world_size)]
