"""A networkx view of the tile programs that run (``explain --format dot|graphml``).

One node per emitted node of every tile program (the top graph's and each repeated
block's, once per input layout), id ``"<program>/<node>"``, with its op, the layout the
sharding pass proved (``rec(node).tags``, :func:`~autocp.passes.tags.layout_name`) and the
source node it was emitted for; redistributions and gathers are marked, so the picture is
what runs, not a guess.
"""

from __future__ import annotations

import torch

from .record import rec
from .tags import layout_name, op_name

__all__ = ["GraphView"]

#: emitted helpers that move data between ranks (tile_ops / attention / opaque calls)
_COMM = ("gather", "exchange", "all_reduce", "ring", "tile_attention", "pack_kv", "transpose", "contract",
         "invoke_opaque", "owner")


class GraphView:
    """A networkx ``DiGraph`` over tile programs ``[(name, fx.GraphModule)]``."""

    def __init__(self, programs):
        import networkx as nx

        self.g = nx.DiGraph()
        for name, gm in programs:
            for nd in gm.graph.nodes:
                nid = f"{name}/{nd.name}"
                tags = rec(nd).tags
                tgt = op_name(nd.target) if nd.op == "call_function" else str(nd.target)
                self.g.add_node(nid, op=nd.op, target=tgt,
                                layout=layout_name(tags if isinstance(tags, (tuple, list)) else None),
                                src=rec(nd).src or "", comm=any(c in tgt for c in _COMM), graph=name,
                                shape=str(tuple(nd.meta["val"].shape)) if isinstance(nd.meta.get("val"), torch.Tensor)
                                else "")
                for inp in nd.all_input_nodes:
                    self.g.add_edge(f"{name}/{inp.name}", nid)

    def to_graphml(self, path: str) -> None:
        import networkx as nx

        nx.write_graphml(self.g, path)

    def to_dot(self) -> str:
        lines = ["digraph autocp {"]
        for nid, a in self.g.nodes(data=True):
            if a.get("op") not in ("call_function", "placeholder", "output"):
                continue
            label = f"{a.get('target')}\\n{a.get('layout')}"
            extra = ", style=filled, fillcolor=salmon" if "gather" in a.get("target", "") else (
                ", style=filled, fillcolor=lightblue" if a.get("comm") else "")
            lines.append(f'  "{nid}" [label="{label}"{extra}];')
        for u, v in self.g.edges():
            if self.g.nodes[u].get("op") in ("call_function", "placeholder"):
                lines.append(f'  "{u}" -> "{v}";')
        lines.append("}")
        return "\n".join(lines)
