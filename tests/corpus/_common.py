"""Shared helpers of the corpus harnesses (no corpus package is imported here)."""

import importlib.util
import sys

import torch

CS, CZ = 16, 8  # single / pair widths of every harness (small: CPU ranks)


def missing(*modules: str):
    """The first of ``modules`` that is not importable (None when all are)."""
    for m in modules:
        if m in sys.modules:
            continue
        try:
            if importlib.util.find_spec(m) is None:
                return m
        except (ImportError, ValueError):
            return m
    return None


def unavailable_unless(modules, importer, what: str):
    """Why a harness cannot run here (None when it can): a module of ``modules`` that is not
    importable, or ``importer()`` (the import of the stack, named ``what``) failing."""
    m = missing(*modules)
    if m:
        return f"{m} is not importable (install the corpus: bash scripts/install_corpus.sh)"
    try:
        importer()
    except Exception as e:  # noqa: BLE001
        return f"{what} does not import: {type(e).__name__}: {str(e)[:200]}"
    return None


def redraw(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter re-drawn from a seeded generator (AF3-style init zeroes output
    projections, which would make every block an identity); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def inputs(n: int, seed: int, cs: int = CS, cz: int = CZ):
    """``s [1,n,cs]``, ``z [1,n,n,cz]``, float token ``mask [1,n]`` with token n-2 masked,
    ``pair_mask = mask[:, :, None] * mask[:, None, :]``."""
    g = torch.Generator().manual_seed(seed + 1)
    s = torch.randn(1, n, cs, generator=g)
    z = torch.randn(1, n, n, cz, generator=g)
    mask = torch.ones(1, n)
    mask[0, n - 2] = 0.0
    pair_mask = mask[:, :, None] * mask[:, None, :]
    return s, z, mask, pair_mask
