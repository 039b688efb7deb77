"""The benchmarks' one plotting preamble: matplotlib on the Agg backend, or ``None`` (the
JSON is the result; the plot is optional)."""

from __future__ import annotations

__all__ = ["pyplot"]


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend, or ``None`` (with a line
    saying so) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt
