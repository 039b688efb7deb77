"""Op registry: each op name maps to implementations with a checker and a priority.

The torch reference of every op is registered at the lowest priority with a checker
that accepts everything, so it is always the fallback (CPU, unsupported shapes,
dtypes). Set ``AUTOCP_KERNELS=reference`` (or call :func:`force_reference`) to use
the reference everywhere while debugging. :func:`explain` says which implementation
runs for given inputs and why the others were skipped.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["Impl", "register", "select", "dispatch", "explain", "implementations", "force_reference"]


@dataclass
class Impl:
    """One implementation of an op.

    ``checker(*args, **kwargs)`` returns ``True`` or a string saying why it cannot run.
    """

    op: str
    name: str
    fn: Callable[..., Any]
    checker: Callable[..., Any] = field(default=lambda *a, **k: True)
    priority: int = 0

    def check(self, *args, **kwargs):
        try:
            ok = self.checker(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- a checker that breaks rejects
            return f"checker raised {type(e).__name__}: {e}"
        return True if ok is True else (ok or "checker returned False")


_REGISTRY: dict[str, list[Impl]] = {}
_FORCE: list[bool] = []


def register(op: str, name: str, fn: Callable, checker: Optional[Callable] = None, priority: int = 0) -> Impl:
    """Add (or replace, by name) an implementation of ``op``."""
    impl = Impl(op, name, fn, checker or (lambda *a, **k: True), priority)
    impls = [i for i in _REGISTRY.get(op, []) if i.name != name]
    impls.append(impl)
    impls.sort(key=lambda i: -i.priority)
    _REGISTRY[op] = impls
    return impl


def implementations(op: str) -> list[Impl]:
    if op not in _REGISTRY:
        raise KeyError(f"unknown kernel op {op!r}; known: {sorted(_REGISTRY)}")
    return list(_REGISTRY[op])


def _forced() -> bool:
    return bool(_FORCE) or os.environ.get("AUTOCP_KERNELS", "").lower() in ("reference", "torch", "ref")


@contextlib.contextmanager
def force_reference(enabled: bool = True):
    """Use only the torch reference implementations inside the block."""
    if enabled:
        _FORCE.append(True)
    try:
        yield
    finally:
        if enabled:
            _FORCE.pop()


def select(op: str, *args, **kwargs) -> Impl:
    """The implementation that :func:`dispatch` would run for these inputs."""
    impls = implementations(op)
    if _forced():
        return impls[-1]
    for impl in impls:
        if impl.check(*args, **kwargs) is True:
            return impl
    return impls[-1]


def dispatch(op: str, *args, **kwargs):
    """Run the highest-priority implementation of ``op`` whose checker accepts the inputs."""
    return select(op, *args, **kwargs).fn(*args, **kwargs)


def explain(op: str, *args, **kwargs) -> str:
    """Human-readable: which implementation runs for these inputs and why others do not."""
    impls = implementations(op)
    chosen = select(op, *args, **kwargs)
    lines = [f"{op}: runs {chosen.name!r}"]
    for impl in impls:
        if impl is chosen:
            mark = "selected"
        elif _forced() and impl is not impls[-1]:
            mark = "skipped: AUTOCP_KERNELS=reference / force_reference()"
        else:
            why = impl.check(*args, **kwargs)
            mark = "skipped: lower priority" if why is True else f"skipped: {why}"
        lines.append(f"  [{impl.priority:>4}] {impl.name}: {mark}")
    return "\n".join(lines)
