"""AlQuraishi lab ``openfold3`` (PyPI ``openfold3==0.5.0``): ``PairFormerStack``.

Stack: ``openfold3/core/model/latent/pairformer.py:218 class PairFormerStack`` (blocks of
``PairFormerBlock``, :37: triangle multiplicative updates, triangle attention, pair
transition, ``AttentionPairBias`` over the single track, SwiGLU transitions).

Call site in the codebase's top-level model, ``OpenFold3.run_trunk``
(``openfold3/projects/of3_all_atom/model.py:309``)::

    s, z = self.pairformer_stack(s=s, z=z,
        single_mask=token_mask.to(dtype=s.dtype), pair_mask=pair_mask.to(dtype=z.dtype),
        chunk_size=..., use_deepspeed_evo_attention=..., use_triton_triangle_kernels=...,
        use_cueq_triangle_kernels=..., use_lma=..., inplace_safe=inplace_safe, _mask_trans=True)

with ``pair_mask = token_mask[..., None] * token_mask[..., None, :]`` (model.py:222) and the
``train`` memory settings of ``projects/of3_all_atom/config/model_config.py:97`` (chunk_size
None, every kernel flag False; ``inplace_safe = not (training or grad enabled)`` = False).
Stack constructor arguments as in model_config.py:289 (``swiglu`` transition, ``inf=1e9``),
shrunk.

Variant ``chunked``: the same call with ``chunk_size=4``, the memory setting a user turns on
for a large complex: every triangle attention, transition and outer product then goes through
openfold3's ``chunk_layer`` (core/utils/chunk_utils.py:209), which walks its inputs with
``type(t) is torch.Tensor`` -- it failed the capture and the eager engine until autocp
claimed it (autocp.passes.functions).
"""

from torch import nn

from tests.corpus._common import CS, CZ, inputs, redraw, unavailable_unless

NAME = "openfold3"
VARIANTS = ("chunked",)
PACKAGE = "openfold3==0.5.0"
CALL_FLAGS = dict(chunk_size=None, use_deepspeed_evo_attention=False, use_cueq_triangle_kernels=False,
                  use_triton_triangle_kernels=False, use_lma=False, inplace_safe=False, _mask_trans=True)


def unavailable():
    return unavailable_unless(("openfold3", "gemmi", "ml_collections", "absl", "biotite", "numpy"), _module,
                              "openfold3.core.model.latent.pairformer")


def _module():
    import openfold3.core.model.latent.pairformer as pf

    return pf


def _stack(seed):
    pf = _module()
    return redraw(pf.PairFormerStack(
        c_s=CS, c_z=CZ, c_hidden_pair_bias=8, no_heads_pair_bias=2, c_hidden_mul=8, c_hidden_pair_att=4,
        no_heads_pair=2, no_blocks=2, transition_type="swiglu", transition_n=2, pair_dropout=0.0,
        fuse_projection_weights=False, blocks_per_ckpt=None, inf=1e9, use_reentrant=False,
        clear_cache_between_blocks=False, tune_chunk_size=False), seed)


def build(seed: int = 0, n: int = 7):
    s, z, mask, pair_mask = inputs(n, seed)
    kwargs = dict(s=s, z=z, single_mask=mask, pair_mask=pair_mask, **CALL_FLAGS)
    return _stack(seed), ((), kwargs), (
        "PairFormerStack(s=, z=, single_mask=, pair_mask=, chunk_size=None, use_*=False, inplace_safe=False, "
        "_mask_trans=True) as OpenFold3.run_trunk calls it (of3_all_atom/model.py:309)")


class Wrapped(nn.Module):
    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, s, z, mask):
        pair_mask = mask[..., :, None] * mask[..., None, :]
        return self.stack(s=s, z=z, single_mask=mask, pair_mask=pair_mask, **CALL_FLAGS)


def build_wrapped(seed: int = 0, n: int = 7):
    s, z, mask, _ = inputs(n, seed)
    return Wrapped(_stack(seed)).eval(), ((s, z, mask), {}), "Wrapped(PairFormerStack).forward(s, z, mask)"


def build_chunked(seed: int = 0, n: int = 7):
    model, (args, kwargs), _ = build(seed, n)
    return model, (args, dict(kwargs, chunk_size=4)), (
        "PairFormerStack(..., chunk_size=4, ...): openfold3's chunk_layer in every triangle attention / transition")
