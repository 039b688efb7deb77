"""autocp.passes -- the compiler: capture -> claim -> shard (one rule table) -> emit.

Each pass documents what it requires and guarantees in the one typed record per node,
``node.meta["autocp"]`` (:mod:`autocp.passes.record`).
"""

__all__ = ["trace", "rewrite", "shard", "emit", "explain", "estimate", "context"]
