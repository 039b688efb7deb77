"""autocp.passes -- the compiler pipeline (trace -> analyze -> match -> rewrite -> emit).

Each pass documents what it requires and guarantees in ``node.meta["autocp.*"]``.
"""

__all__ = ["trace", "analyze", "match", "rewrite", "emit", "explain", "estimate", "context"]
