"""Function claims: a model's python helper replaced, while autocp captures or runs the model,
by an exact equivalent that works on fake tensors and tiles.

Some helpers reject anything but a plain tensor. The openfold-derived ``chunk_layer`` (in
openfold3, Protenix and Boltz, and their forks) walks its inputs with
``type(t) is torch.Tensor`` and raises ``ValueError("Not supported")`` for a FakeTensor (so
``torch.export`` fails) or a :class:`~autocp.passes.eager.TileTensor` (so the eager engine
fails). Chunking there is a memory device only: ``chunk_layer(layer, inputs, chunk_size,
no_batch_dims)`` is by its contract ``layer`` applied to every sub-batch of the flattened
batch dims. :func:`whole_chunk_layer` is that computation in one chunk -- the same
broadcast, flatten, call and reshape, with no type test -- so the result is the same values.
autocp's own tiles are already ``1/P`` of the pair tensor.

A claim names a function by module and attribute (``"openfold3.core.utils.chunk_utils:
chunk_layer"``); the module is never imported here. While :func:`claimed_functions` is
active, every loaded module global bound to the original object (the defining module and
each ``from ... import chunk_layer`` site) is bound to the replacement, and restored after.
:func:`register_function` adds a claim.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["register_function", "claimed_functions", "whole_chunk_layer", "FUNCTION_CLAIMS"]

#: "module:attr" -> replacement
FUNCTION_CLAIMS: dict = {}
_LOCK = threading.RLock()
_DEPTH = {"n": 0, "saved": []}


def register_function(target: str, replacement: Callable) -> None:
    """Replace the function ``target`` (``"package.module:name"``) by ``replacement`` while
    autocp captures or runs a model. ``replacement`` must compute the same values for every
    call the model makes (it is not checked); use it for helpers that reject tensor
    subclasses or fake tensors, not to change a model's math."""
    mod, sep, name = target.partition(":")
    if not sep or not mod or not name:
        raise ValueError(f"register_function: given {target!r}; required 'package.module:function'. "
                         f"Fix: e.g. 'openfold3.core.utils.chunk_utils:chunk_layer'.")
    if not callable(replacement):
        raise TypeError(f"register_function: given a {type(replacement).__name__} as the replacement of "
                        f"{target}; required a callable.")
    FUNCTION_CLAIMS[target] = replacement


_SITES: dict = {}  # target -> (len(sys.modules) when scanned, original, [(module dict, name)])


def _sites_for(target: str, original) -> list:
    """The binding sites of ``original``: scanned once, again only when modules were loaded
    since (a scan of every loaded module costs ~0.1 s; this runs around every engine call)."""
    n = len(sys.modules)
    hit = _SITES.get(target)
    if hit is None or hit[0] != n or hit[1] is not original:
        hit = _SITES[target] = (n, original, _binding_sites(original))
    return [(d, k) for d, k in hit[2] if d.get(k) is original]


def _binding_sites(original) -> list:
    """``[(module dict, name)]`` of every loaded module global bound to ``original``."""
    sites = []
    for m in list(sys.modules.values()):
        d = getattr(m, "__dict__", None)
        if not isinstance(d, dict):
            continue
        for k, v in list(d.items()):
            if v is original:
                sites.append((d, k))
    return sites


@contextlib.contextmanager
def claimed_functions():
    """Inside the block, every claimed function whose module is loaded is replaced at each of
    its binding sites (nestable; restored on exit)."""
    with _LOCK:
        if _DEPTH["n"] == 0:
            saved = []
            for target, repl in FUNCTION_CLAIMS.items():
                mod, _, name = target.partition(":")
                original = getattr(sys.modules.get(mod), name, None)
                if original is None or original is repl:
                    continue
                for d, k in _sites_for(target, original):
                    saved.append((d, k, original))
                    d[k] = repl
            _DEPTH["saved"] = saved
        _DEPTH["n"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH["n"] -= 1
            if _DEPTH["n"] == 0:
                for d, k, original in _DEPTH["saved"]:
                    d[k] = original
                _DEPTH["saved"] = []


def whole_chunk_layer(layer: Callable, inputs: dict, chunk_size: int, no_batch_dims: int, low_mem: bool = False,
                      _out=None, _add_into_out: bool = False):
    """openfold's ``chunk_layer`` with one chunk: inputs broadcast over the leading
    ``no_batch_dims`` dims and flattened to one batch dim, ``layer(**inputs)`` once, outputs
    reshaped back; ``_out`` / ``_add_into_out`` write into ``_out`` as the original does.
    ``chunk_size`` and ``low_mem`` only choose how the original splits the same computation."""
    if not inputs:
        raise ValueError("Must provide at least one input")
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    batch = tuple(max(s) for s in zip(*[tuple(t.shape[:no_batch_dims]) for t in leaves]))

    def prep(t):
        if not isinstance(t, torch.Tensor):
            return t
        if sum(t.shape[:no_batch_dims]) != no_batch_dims:
            t = t.expand(batch + tuple(t.shape[no_batch_dims:]))
        return t.reshape(-1, *t.shape[no_batch_dims:])

    out = layer(**tree_map(prep, inputs))
    flat = 1
    for d in batch:
        flat *= d

    def back(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.shape[0] != flat:  # the original allocates [flat, ...] and assigns: a broadcast of a 1
            t = t.expand(flat, *t.shape[1:])
        return t.reshape(batch + tuple(t.shape[1:]))

    out = tree_map(back, out)
    if _out is None:
        return out
    dst, spec = tree_flatten(_out)
    src = tree_flatten(out)[0]
    for a, b in zip(dst, src):
        if _add_into_out:
            a += b
        else:
            a.copy_(b)
    return tree_unflatten(dst, spec)


for _target in ("openfold3.core.utils.chunk_utils:chunk_layer", "openfold.utils.chunk_utils:chunk_layer",
                "protenix.model.utils:chunk_layer", "protenix.openfold_local.utils.chunk_utils:chunk_layer",
                "boltz.model.layers.triangular_attention.utils:chunk_layer"):
    register_function(_target, whole_chunk_layer)
