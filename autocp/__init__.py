"""autocp -- 2D context parallelism for AlphaFold3-like co-folding models.

The pair representation ``z[B, N, N, C]`` is tiled over a square ``p x p`` device mesh:
rank ``(r, c)`` holds ``z[:, T_r, T_c, :]`` (``T_t`` = the t-th block of ``ceil(N/p)``
tokens), so per-device memory falls as ``O(N^2 / P)``.
"""

from . import comm, layout
from .layout import ColToken, Layout, LayoutError, MsaTiles, Pair2D, Replicated, RowToken
from .memory import MemoryTracker
from .mesh import MeshError, SquareMesh, init_mesh
from .api import check, estimate, explain, parallelize
from .registry import register_module
from .passes.functions import register_function
from .ops.common import chunking
from .tile_io import CotangentError, tile_sum

__version__ = "0.1.0"

__all__ = [
    "SquareMesh",
    "init_mesh",
    "MeshError",
    "Layout",
    "LayoutError",
    "Pair2D",
    "RowToken",
    "ColToken",
    "Replicated",
    "MsaTiles",
    "MemoryTracker",
    "parallelize",
    "explain",
    "estimate",
    "check",
    "register_module",
    "register_function",
    "chunking",
    "tile_sum",
    "CotangentError",
    "comm",
    "layout",
]
