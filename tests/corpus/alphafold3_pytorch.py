"""lucidrains ``alphafold3-pytorch`` (PyPI ``alphafold3-pytorch==0.8.3``): ``PairformerStack``.

Stack: ``alphafold3_pytorch/alphafold3.py:1419 class PairformerStack`` (Algorithm 17:
``PairwiseBlock`` = triangle multiplication out/in + triangle attention start/end + pair
transition, then ``AttentionPairBias`` + single transition).

Call site in the codebase's top-level model, ``Alphafold3.forward``
(``alphafold3_pytorch/alphafold3.py:7262``)::

    single, pairwise = self.pairformer(single_repr = single, pairwise_repr = pairwise, mask = mask)

with ``mask = molecule_atom_lens > 0`` (bool ``[b, n]``, ``alphafold3.py:7181``): keyword
arguments only, a boolean token mask, no pair mask.

Import: the package ``__init__`` imports its trainer (``lightning``), CLI and web app
(``gradio``), none of which the model uses; the harness imports the model module
``alphafold3_pytorch.alphafold3`` with the package's path registered but its ``__init__``
not run. No file of the package is modified.
"""

import importlib
import importlib.util
import sys
import types

import torch
from torch import nn

from tests.corpus._common import CS, CZ, inputs, redraw, unavailable_unless

NAME = "alphafold3_pytorch"
PACKAGE = "alphafold3-pytorch==0.8.3"


def unavailable():
    """Why the harness cannot run here (None when it can)."""
    return unavailable_unless(
        ("alphafold3_pytorch", "einx", "einops", "jaxtyping", "beartype", "rdkit", "Bio", "polars", "huggingface_hub",
         "colt5_attention", "frame_averaging_pytorch", "taylor_series_linear_attention"), af3_module,
        "alphafold3_pytorch.alphafold3")


def af3_module():
    """``alphafold3_pytorch.alphafold3`` without running the package ``__init__`` (it imports
    lightning and gradio); no file of the package changes."""
    if "alphafold3_pytorch.alphafold3" in sys.modules:
        return sys.modules["alphafold3_pytorch.alphafold3"]
    if "alphafold3_pytorch" not in sys.modules:
        spec = importlib.util.find_spec("alphafold3_pytorch")
        pkg = types.ModuleType("alphafold3_pytorch")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = spec.origin
        pkg.__spec__ = spec
        sys.modules["alphafold3_pytorch"] = pkg
    return importlib.import_module("alphafold3_pytorch.alphafold3")


def _stack(seed):
    af3 = af3_module()
    stack = af3.PairformerStack(
        dim_single=CS, dim_pairwise=CZ, depth=2, pair_bias_attn_dim_head=8, pair_bias_attn_heads=2,
        dropout_row_prob=0.0,
        pairwise_block_kwargs=dict(tri_mult_dim_hidden=8, tri_attn_dim_head=4, tri_attn_heads=2,
                                   dropout_row_prob=0.0, dropout_col_prob=0.0))
    return redraw(stack, seed)


def build(seed: int = 0, n: int = 7):
    model = _stack(seed)
    s, z, mask, _ = inputs(n, seed)
    kwargs = dict(single_repr=s, pairwise_repr=z, mask=mask.bool())
    return model, ((), kwargs), ("PairformerStack(single_repr=s, pairwise_repr=z, mask=bool[b,n]) "
                                 "as Alphafold3.forward calls it (alphafold3.py:7262)")


class Wrapped(nn.Module):
    """``forward(s, z, mask)`` with a float token mask. This stack takes no pair mask (it builds
    the pairwise mask from ``mask`` itself), so the wrapper only converts ``mask`` to bool."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, s, z, mask):
        return self.stack(single_repr=s, pairwise_repr=z, mask=mask > 0.5)


def build_wrapped(seed: int = 0, n: int = 7):
    s, z, mask, _ = inputs(n, seed)
    return Wrapped(_stack(seed)).eval(), ((s, z, mask), {}), "Wrapped(PairformerStack).forward(s, z, mask)"
