"""autocp.passes -- the compiler pipeline (trace -> analyze -> match -> rewrite -> emit).

Each pass documents what it requires and guarantees in ``node.meta["autocp.*"]``.
"""

__all__: list[str] = []
