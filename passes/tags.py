"""Per-tensor layout tags of a call's pytree (``(args, kwargs)`` or an output).

A *tag tuple* gives, for each dim of one tensor leaf, ``'r'`` / ``'c'`` (token axis split
over mesh rows / columns), ``'s'`` (MSA rows) or ``None``; a call carries one tag tuple per
tensor leaf in ``tree_flatten`` order (missing trailing entries mean ``None``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["map_tagged"]


def map_tagged(tree, tags: Sequence[Optional[tuple]], fn: Callable[[torch.Tensor, Optional[tuple]], torch.Tensor]):
    """Rebuild ``tree`` with every tensor leaf replaced by ``fn(leaf, its tag tuple)``."""
    leaves, spec = tree_flatten(tree)
    out, k = [], 0
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            leaf = fn(leaf, tags[k] if k < len(tags) else None)
            k += 1
        out.append(leaf)
    return tree_unflatten(out, spec)
