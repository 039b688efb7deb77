"""Tencent ``tfold`` (PyPI ``tfold==1.0.2``): ``EvoformerStackSS`` (single-sequence Evoformer).

Stack: ``tfold/model/module/evoformer/evoformer_ss.py:149 class EvoformerStackSS`` (blocks of
``EvoformerBlockSS``, :88: sequence attention with pair bias + single transition, outer
product mean of the single track into ``z``, triangle multiplication outgoing/incoming,
triangle attention starting/ending node, pair transition). ``tfold.model.module.evoformer`` is
the package directory ``evoformer/`` (it shadows the stale ``evoformer.py`` beside it).

Call site in the codebase's top-level model, ``ComplexStructureModel.forward``
(``tfold/model/arch/core/complex_structure_model.py:158``, the trunk of tFold-Ab/-Ag/-TCR)::

    sfea_tns, pfea_tns = self.net['evoformer'](sfea_tns, pfea_tns, chunk_size=chunk_size)

positional, no mask (one unpadded complex per call), ``chunk_size=None`` by default
(``forward(..., chunk_size=None)``, :112). Stack constructor as at :85
(``EvoformerStackSS(self.c_s, self.c_z, num_layers=self.num_2d_layers)``), shrunk; the stack
builds its blocks with the block defaults (12 sequence heads x 32, 8 pair heads x 32, triangle
multiplication hidden 128, ``hea_dim`` etc. are not exposed).

``build_wrapped``: the stack takes no mask, so ``Wrapped.forward(s, z, mask)`` builds the pair
mask from the token mask and zeroes the masked token's single row and pair rows/columns
before the stack (padding as tFold's featurizer leaves it: zero features).

Import: the package ``__init__`` (``tfold/__init__.py``) imports its predictors (``AgModel``,
``AgPredictor``: esm, structure module, deploy code); the harness registers the package paths of
``tfold``, ``tfold.model`` and ``tfold.model.module`` without running their ``__init__`` and
imports the stack's module. No file of the package is modified.
"""

import importlib
import importlib.util
import sys
import types

from torch import nn

from tests.corpus._common import CS, CZ, inputs, redraw, unavailable_unless

NAME = "tfold"
PACKAGE = "tfold==1.0.2"
MODULE = "tfold.model.module.evoformer.evoformer_ss"


def unavailable():
    return unavailable_unless(("tfold", "ml_collections", "yaml", "termcolor", "numpy", "scipy"), _module, MODULE)


def _module():
    """``tfold.model.module.evoformer.evoformer_ss`` without running the ``__init__`` of
    ``tfold``, ``tfold.model``, ``tfold.model.module`` (they import the whole predictor)."""
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    for name in ("tfold", "tfold.model", "tfold.model.module"):
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = spec.origin
        pkg.__spec__ = spec
        sys.modules[name] = pkg
    return importlib.import_module(MODULE)


def _stack(seed):
    ev = _module()
    return redraw(ev.EvoformerStackSS(CS, CZ, num_layers=2), seed)


def build(seed: int = 0, n: int = 7):
    s, z, _, _ = inputs(n, seed)
    return _stack(seed), ((s, z), dict(chunk_size=None)), (
        "EvoformerStackSS(s, z, chunk_size=None) as ComplexStructureModel.forward calls it "
        "(tfold/model/arch/core/complex_structure_model.py:158)")


class Wrapped(nn.Module):
    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, s, z, mask):
        pair_mask = mask[..., :, None] * mask[..., None, :]
        return self.stack(s * mask[..., None], z * pair_mask[..., None], chunk_size=None)


def build_wrapped(seed: int = 0, n: int = 7):
    s, z, mask, _ = inputs(n, seed)
    return Wrapped(_stack(seed)).eval(), ((s, z, mask), {}), "Wrapped(EvoformerStackSS).forward(s, z, mask)"
