"""``msa-pairformer`` (PyPI ``msa-pairformer==1.0.2``, MSA Pairformer, Akiyama et al.):
``CoreModule``.

Stack: ``MSA_Pairformer/model.py:21 class CoreModule``: per layer, MSA pair-weighted averaging
(``MSAPairWeightedAveraging``, pairwise_operations.py:335: softmax over the pair bias of each
row ``i`` over ``j``, applied to the MSA values) + MSA transition, a query-biased outer product
(``PresoftmaxDifferentialOuterProductMean``, outer_product.py:150: differential attention of
the query row over the MSA rows -> sequence weights, softmax over the MSA axis, weighted outer
product over the MSA rows divided by a masked pair denominator), then ``PairwiseBlock``
(pairwise_operations.py:408: triangle multiplication outgoing + incoming, pair transition; no
triangle attention); a final pair-weighted averaging + transition of the MSA.

Call site in the codebase's top-level model, ``MSAPairformer.forward``
(``MSA_Pairformer/model.py:492``)::

    results = self.core_stack(pairwise_repr=, msa=, mask=, msa_mask=, full_mask=,
        pairwise_mask=, seq_weights=, seq_weights_dict=, query_only=, return_seq_weights=,
        return_msa_repr_layer_idx=, return_pairwise_repr_layer_idx=,
        return_repr_after_layer_idx=, store_pairwise_repr_cpu=, store_msa_repr_cpu=,
        use_checkpointing_triangles=)

with ``MSAPairformer.forward``'s defaults: ``seq_weights=None, seq_weights_dict={}``,
``query_only=True``, ``return_seq_weights=False``, ``return_msa_repr_layer_idx=None``,
``return_pairwise_repr_layer_idx=[contact_layer, confind_contact_layer]`` (both contact heads
on, which also forces ``store_pairwise_repr_cpu=False``), ``return_repr_after_layer_idx=None``,
``store_msa_repr_cpu=True``, ``use_checkpointing_triangles=False``. The masks are the package's
own (``prepare_msa_masks``, dataset.py:580): bool ``mask [b,n]``, ``msa_mask [b,s]``,
``full_mask [b,s,n]``, ``pairwise_mask [b,n,n]``. Constructor arguments as
``MSAPairformer.__init__`` (model.py:275) passes them, shrunk (dim_msa 16, dim_pairwise 8,
depth 2, contact layers 0 and 1 of 2 instead of 15 and 18 of 22).

Inputs: ``msa [1, 5, n, 16]`` (5 MSA rows, the last one padded), ``pairwise_repr [1, n, n, 8]``,
token ``n - 2`` padded. Outputs: a dict (``final_msa_repr``: the query row, ``final_pairwise_repr``,
``pairwise_repr_d`` with the two contact layers' pair tensors).

Import: ``MSA_Pairformer/pairwise_operations.py:22`` defines ``CUEQUIVARIANCE_AVAILABLE`` only
inside ``if torch.cuda.is_available():`` (``try ... except ImportError``), so on a machine
without CUDA the module raises ``NameError`` at import (package bug). The harness imports it
with ``torch.cuda.is_available`` reporting True for the duration of the import only, which
makes the package take its own fallback (``import cuequivariance_torch`` -> ImportError ->
``CUEQUIVARIANCE_AVAILABLE = False``, the plain-PyTorch triangle multiplication), exactly what a
CUDA machine without cuEquivariance runs. It refuses to run if ``cuequivariance_torch`` is
importable (then that import would succeed and pick the GPU kernel). No file of the package is
modified.
"""

import sys
from unittest import mock

import torch
from torch import nn

from tests.corpus._common import CS, CZ, missing, redraw, unavailable_unless

NAME = "msa_pairformer"
PACKAGE = "msa-pairformer==1.0.2"
S = 5  # MSA rows (the last one padded)


def unavailable():
    if missing("cuequivariance_torch") is None:
        return "cuequivariance_torch is importable: MSA_Pairformer would pick its GPU triangle kernel"
    return unavailable_unless(("MSA_Pairformer", "einx", "einops", "jaxtyping", "environs", "huggingface_hub", "numpy"),
                              _module, "MSA_Pairformer.model")


def _module():
    if "MSA_Pairformer.model" in sys.modules:
        return sys.modules["MSA_Pairformer.model"]
    with mock.patch.object(torch.cuda, "is_available", lambda: True):
        import MSA_Pairformer.model as model
    assert not model.cuex_is_available()
    return model


def _core(seed):
    mp = _module()
    core = mp.CoreModule(
        depth=2, dim_pairwise=CZ, dim_msa=CS,
        opm_kwargs=dict(dim_opm_hidden=4, outer_product_flavor="presoftmax_differential_attention", seq_attn=True,
                        dim_qk=8, chunk_size=None, return_seq_weights=True, lambda_init=None, eps=1e-32),
        pwa_kwargs=dict(heads=2, dim_head=8, dropout=0.0, dropout_type="row"),
        pairwise_block_kwargs=dict(dropout_row_prob=0, dropout_col_prob=0, tri_mult_dim_hidden=None,
                                   use_triangle_updates=True, use_pair_updates=False))
    return redraw(core, seed)


CONTACT_LAYERS = [0, 1]  # MSAPairformer(contact_layer=0, confind_contact_layer=1) for depth 2
CALL_FLAGS = dict(seq_weights=None, query_only=True, return_seq_weights=False, return_msa_repr_layer_idx=None,
                  return_repr_after_layer_idx=None, store_pairwise_repr_cpu=False, store_msa_repr_cpu=True,
                  use_checkpointing_triangles=False)


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed + 1)
    msa = torch.randn(1, S, n, CS, generator=g)
    z = torch.randn(1, n, n, CZ, generator=g)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, n - 2] = False
    return msa, z, mask


def build(seed: int = 0, n: int = 7):
    msa, z, mask = _inputs(n, seed)
    # prepare_msa_masks (dataset.py:580) of an MSA whose token n-2 and row S-1 are padding
    full_mask = mask[:, None, :].expand(1, S, n).clone()
    full_mask[:, S - 1] = False
    msa_mask = full_mask.any(dim=2)
    pairwise_mask = mask[:, :, None] & mask[:, None, :]
    kwargs = dict(pairwise_repr=z, msa=msa, mask=mask, msa_mask=msa_mask, full_mask=full_mask,
                  pairwise_mask=pairwise_mask, seq_weights_dict={},
                  return_pairwise_repr_layer_idx=list(CONTACT_LAYERS), **CALL_FLAGS)
    return _core(seed), ((), kwargs), (
        "CoreModule(pairwise_repr=, msa=, mask=, msa_mask=, full_mask=, pairwise_mask=, ...) as "
        "MSAPairformer.forward calls it (MSA_Pairformer/model.py:492)")


class Wrapped(nn.Module):
    def __init__(self, core):
        super().__init__()
        self.core = core

    def forward(self, msa, z, mask):
        mask = mask.bool()
        pairwise_mask = mask[..., :, None] & mask[..., None, :]
        full_mask = mask[:, None, :].expand(msa.shape[:-1])
        res = self.core(pairwise_repr=z, msa=msa, mask=mask, msa_mask=None, full_mask=full_mask,
                        pairwise_mask=pairwise_mask, seq_weights_dict={},
                        return_pairwise_repr_layer_idx=list(CONTACT_LAYERS), **CALL_FLAGS)
        return res["final_msa_repr"], res["final_pairwise_repr"]


def build_wrapped(seed: int = 0, n: int = 7):
    msa, z, mask = _inputs(n, seed)
    return Wrapped(_core(seed)).eval(), ((msa, z, mask.float()), {}), "Wrapped(CoreModule).forward(msa, z, mask)"
