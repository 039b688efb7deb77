"""One typed record per FX node: what the passes know about it (``node.meta["autocp"]``).

Every pass reads :func:`rec` and writes :func:`put`; no other ``autocp.*`` meta key
exists. The record is frozen and :func:`put` replaces it, so a node copied with its meta
(``node_copy``, ``meta.update``) never shares a mutable record with its original.

Fields, by the pass that writes them:

* trace -- ``opaque``: the :class:`~autocp.passes.trace.OpaqueEntry` of an opaque call
  (a registered module, a repeated block instance, a fallback module);
* analyze -- ``layout``: per-dim layout tags of the value (a tuple, or a list of them for a
  multi-output node); ``kind``: ``"pair"`` / ``"token"`` / ``"msa"`` / ``"other"``;
  ``needs_full``: why the op would need a whole tensor (None: it does not); ``comm``: the
  cheap layout conversion it needs instead; ``contracted``: the tags of contracted dims;
  ``operands``: a contraction's operand nodes; ``softmax_tag``: the token tag a softmax /
  reduction runs over; ``shape_rewrite``: a token-length shape constant recomputed on
  tiles; ``in_layouts`` / ``out_layouts``: an opaque call's boundary layouts;
* match -- ``match``: the :class:`~autocp.passes.match.Match` a node belongs to;
  ``layout_override``: a matched op's output layout, for the second analysis round;
* structural / shard -- ``param``: a placeholder that is a parameter or buffer;
  ``src``: the source node a tile-program node was emitted for; ``tags``: the tile
  program's proven layout tags of the value;
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
    layout: Any = None
    kind: Optional[str] = None
    needs_full: Optional[str] = None
    comm: Optional[str] = None
    contracted: Optional[dict] = None
    operands: Optional[list] = None
    softmax_tag: Optional[str] = None
    shape_rewrite: Optional[str] = None
    in_layouts: Optional[list] = None
    out_layouts: Any = None
    match: Any = None
    layout_override: Optional[tuple] = None
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
