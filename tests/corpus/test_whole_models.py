"""Whole public AF3 models through ``autocp.parallelize``, unmodified, called as their own
inference path calls them (``-m corpus``; needs ``bash scripts/install_corpus.sh``).

lucidrains ``Alphafold3`` (``alphafold3_pytorch_whole.py``): its capture fails on a value
``assert`` (``sum_pool_with_lens``) and the sampler's ``.item()``, so ``parallelize`` warns,
naming the module and line, and runs it on the eager engine, where each parameterised
submodule is an island (``passes/island.py``): captured and sharded alone when it can be
(the pairformer, MSA module, template embedder, the token transformer, the confidence
pairformer), its python op by op when not. On 2x2, same seed, the sampled positions and the
confidence head's PAE / PDE / pLDDT / resolved logits equal the single-device call. Two
gathering ops remain (warned): the template stack's attention over merged template x token
rows and a token gather of the conditioned pair (the outer product mean and the windowed
masks ran gathered until ATen alias ops -- ``torch.multiply`` / ``torch.less`` from einx --
became pointwise).

ByteDance ``Protenix`` (``protenix_whole.py``): the same path, see its test."""

import pytest

from autocp.testing import run_distributed
from tests.corpus import alphafold3_pytorch_whole as af3w
from tests.corpus import protenix_whole as pxw

pytestmark = [pytest.mark.corpus, pytest.mark.distributed]


@pytest.mark.skipif(af3w.unavailable() is not None, reason=str(af3w.unavailable()))
def test_alphafold3_pytorch_whole_model_2x2():
    for r in run_distributed(af3w.whole_parity_worker, 4, 0, 7, True, timeout=1200):
        assert len(r["rel_err"]) == 5 and max(r["rel_err"]) < 1e-4, r["rel_err"]
        assert len(r["engine"]) == 1 and "alphafold3.py:369" in r["engine"][0], r["engine"]
        # captured where it can be: the trunk's stacks run their sharded tile programs
        for island in ("pairformer: captured", "msa_module: captured", "confidence_head.pairformer_stack: captured",
                       "diffusion_module.token_transformer: captured"):
            assert island in r["explain"], r["explain"]
        assert r["gathers"] <= 2, r["gather_msgs"]  # 38 with the whole model op by op; 5 before the aliases


@pytest.mark.skipif(pxw.unavailable() is not None, reason=str(pxw.unavailable()))
def test_protenix_whole_model_2x2():
    """Protenix (its own inference call, unbatched features with per-key layouts): capture
    fails on a data-dependent scatter size, so it runs on the engine with islands; the
    in-place inference triangle updates (``z += x`` into a redistributed value) make their
    islands run op by op. Coordinates, contact probabilities and the confidence logits equal
    the single-device call on 2x2."""
    for r in run_distributed(pxw.whole_parity_worker, 4, 0, 7, True, timeout=1200):
        assert len(r["rel_err"]) == 6 and max(r["rel_err"]) < 1e-4, r["rel_err"]
        assert len(r["engine"]) == 1 and "scatter_utils.py" in r["engine"][0], r["engine"]
        assert "pairformer_stack.blocks.0.tri_att_start: captured" in r["explain"], r["explain"]
