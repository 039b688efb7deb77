"""One typed record per FX node: what the passes know about it (``node.meta["autocp"]``).

Every pass reads :func:`rec` and writes :func:`put`; no other ``autocp.*`` meta key
exists. The record is frozen and :func:`put` replaces it, so a node copied with its meta
(``node_copy``, ``meta.update``) never shares a mutable record with its original.

Fields, by the pass that writes them:

* trace -- ``opaque``: the :class:`~autocp.passes.trace.OpaqueEntry` of an opaque call
  (a registered module, a repeated block instance, a module kept opaque on request);
* shard -- ``param``: a placeholder that is a parameter or buffer; ``src``: the source
  node a tile-program node was emitted for; ``tags``: the tile program's proven layout
  tags of the value (the one propagator's result: :mod:`autocp.passes.shard`);
* storage -- ``fresh``: the value owns a fresh, unaliased buffer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["NodeRecord", "rec", "put", "KEY"]

#: the one meta key autocp writes
KEY = "autocp"


@dataclass(frozen=True)
class NodeRecord:
    opaque: Any = None
    param: bool = False
    src: Optional[str] = None
    tags: Any = None
    fresh: bool = False


_EMPTY = NodeRecord()


def rec(node) -> NodeRecord:
    """The node's record (an empty one when no pass wrote it; never stored by reading)."""
    return node.meta.get(KEY, _EMPTY)


def put(node, **fields) -> NodeRecord:
    """Replace the node's record with these fields changed; returns the new record."""
    new = dataclasses.replace(node.meta.get(KEY, _EMPTY), **fields)
    node.meta[KEY] = new
    return new
