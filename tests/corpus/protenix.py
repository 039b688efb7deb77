"""ByteDance ``protenix`` (PyPI ``protenix==2.0.0``): ``PairformerStack``.

Stack: ``protenix/model/modules/pairformer.py:227 class PairformerStack`` (blocks of
``PairformerBlock``, :42: triangle multiplication out/in, triangle attention start/end,
pair transition, ``AttentionPairBias`` + single transition; ``checkpoint_blocks``).

Call site in the codebase's top-level model, ``Protenix.get_pairformer_output``
(``protenix/model/protenix.py:288``)::

    s, z = self.pairformer_stack(s, z, pair_mask=None,
        triangle_multiplicative=self.configs.triangle_multiplicative,
        triangle_attention=self.configs.triangle_attention,
        inplace_safe=inplace_safe, chunk_size=chunk_size)

Protenix runs one unpadded structure: the trunk passes ``pair_mask=None``. The training
loop (``main_train_loop``, protenix.py:657) uses ``inplace_safe=False, chunk_size=None``;
``"torch"`` is the kernel choice without CUDA (the config default ``"cuequivariance"`` needs
a GPU package). ``build_wrapped`` passes a real pair mask, as the confidence head does
(``protenix/model/modules/confidence.py:307``: ``self.pairformer_stack(s, z, pair_mask, ...)``).

Import: ``LAYERNORM_TYPE=torch`` (the package's own switch, triangular/layers.py:32) is set
before import, else it JIT-compiles a CUDA LayerNorm extension at import time.
"""

import os

from torch import nn

from tests.corpus._common import CS, CZ, inputs, redraw, unavailable_unless

NAME = "protenix"
PACKAGE = "protenix==2.0.0"
CALL_FLAGS = dict(triangle_multiplicative="torch", triangle_attention="torch", inplace_safe=False, chunk_size=None)


def unavailable():
    return unavailable_unless(("protenix", "rdkit", "optree", "scipy", "numpy"), _module,
                              "protenix.model.modules.pairformer")


def _module():
    os.environ.setdefault("LAYERNORM_TYPE", "torch")
    import protenix.model.modules.pairformer as pf

    return pf


def _stack(seed):
    pf = _module()
    # c_hidden_mul=128, c_hidden_pair_att=32, no_heads_pair=4 are PairformerBlock defaults the
    # stack does not expose
    return redraw(pf.PairformerStack(n_blocks=2, n_heads=2, c_z=CZ, c_s=CS, num_intermediate_factor=2,
                                     dropout=0.0, blocks_per_ckpt=None), seed)


def build(seed: int = 0, n: int = 7):
    s, z, _, _ = inputs(n, seed)
    return _stack(seed), ((s, z), dict(pair_mask=None, **CALL_FLAGS)), (
        "PairformerStack(s, z, pair_mask=None, triangle_multiplicative='torch', triangle_attention='torch', "
        "inplace_safe=False, chunk_size=None) as Protenix.get_pairformer_output calls it (protenix.py:288)")


class Wrapped(nn.Module):
    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, s, z, mask):
        pair_mask = mask[..., :, None] * mask[..., None, :]
        return self.stack(s, z, pair_mask, **CALL_FLAGS)


def build_wrapped(seed: int = 0, n: int = 7):
    s, z, mask, _ = inputs(n, seed)
    return Wrapped(_stack(seed)).eval(), ((s, z, mask), {}), "Wrapped(PairformerStack).forward(s, z, mask)"
