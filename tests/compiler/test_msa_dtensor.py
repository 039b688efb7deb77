"""autocp.parallelize on Boltz-2 ``MSAModule`` and DTensor inputs/outputs (gloo ranks).

MSAModule: 2 blocks, msa_s = token_z = 8, N = 7 tokens and S = 5 MSA rows (neither
divisible by 2 or 3), a padded token and padded MSA entries, every parameter re-drawn
(AF3 init zeroes output projections), dropout 0, eval and train: the z output and every
parameter gradient (after ``sync_grads``) are compared with the original on one process.

DTensor: inputs given as DTensors with the layout's placements (``Layout.to_dtensor``)
and ``output="dtensor"``; ``.full_tensor()`` of the outputs must equal the single-device
outputs (Pairformer: s and z; MSAModule: z).
"""

import warnings

import pytest
import torch

from autocp.testing import run_distributed

pytestmark = pytest.mark.distributed

N, S, CM, CZ, CS = 7, 5, 8, 8, 8


def build_msa(blocks=2, seed=0):
    from boltz.model.modules.trunkv2 import MSAModule

    m = MSAModule(msa_s=CM, token_z=CZ, token_s=CS, msa_blocks=blocks, msa_dropout=0.0, z_dropout=0.0,
                  pairwise_head_width=4, pairwise_num_heads=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def msa_inputs(n=N, s=S, seed=1):
    from boltz.data import const

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, n, n, CZ, generator=g)
    emb = torch.randn(1, n, CS, generator=g)
    tok = torch.ones(1, n, dtype=torch.long)
    tok[0, -2] = 0
    msa_mask = (torch.rand(1, s, n, generator=g) > 0.2).long()
    msa_mask[0, 0] = 1
    feats = {
        "msa": torch.randint(0, const.num_tokens, (1, s, n), generator=g),
        "has_deletion": (torch.rand(1, s, n, generator=g) > 0.7).float(),
        "deletion_value": torch.rand(1, s, n, generator=g),
        "msa_paired": (torch.rand(1, s, n, generator=g) > 0.5).float(),
        "msa_mask": msa_mask,
        "token_pad_mask": tok,
    }
    return z, emb, feats


def msa_parity_worker(rank, world, train):
    import autocp
    from autocp.api import parallelize
    from autocp.ops.common import sync_grads

    mesh = autocp.init_mesh()
    model = build_msa()
    model.train(train)
    z, emb, feats = msa_inputs()
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        pm = parallelize(model, mesh, example_inputs=(z, emb, feats))
    pm.train(train)
    ref = model(z, emb, feats)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    (ref * w).sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    out = pm(z, emb, feats)
    (out * w).sum().backward()
    sync_grads(pm, mesh)
    floor = 1e-2 * max(float(g.abs().max()) for g in ref_grads.values())
    per_param = {k: float((p.grad - ref_grads[k]).abs().max()) / max(float(ref_grads[k].abs().max()), floor)
                 for k, p in pm.named_parameters() if p.grad is not None}
    return {
        "out_err": float((out.detach() - ref.detach()).abs().max()),
        "scale": float(ref.detach().abs().max()),
        "moved": float((ref.detach() - z).abs().max()),
        "grad_err": max(per_param.values()),
        "worst": max(per_param, key=per_param.get),
        "missing": [k for k, p in pm.named_parameters() if p.grad is None],
        "same_keys": sorted(pm.state_dict()) == sorted(model.state_dict()),
        "actions": {k: a.action for k, a in pm.plan.actions.items()},
        "warnings": [str(x.message)[:300] for x in wl],
    }


def _as_dtensor(x, tags, mesh, n, n_seq):
    from autocp.passes.emit import layout_of_tags

    lay = layout_of_tags(tags)
    sizes = [n_seq if t == "s" else n for t in tags if t is not None]
    return lay.to_dtensor(lay.shard(x, mesh) if sizes else x, mesh, sizes)


def dtensor_worker(rank, world):
    """Pairformer (Boltz-2, N=7) and MSAModule: DTensor inputs with the layout's
    placements, ``output="dtensor"``; ``full_tensor()`` vs the single-device outputs."""
    import autocp
    from autocp.api import parallelize
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_flatten, tree_unflatten
    from tests.compiler._workers import build_pairformer, pairformer_inputs

    mesh = autocp.init_mesh()
    res = {}
    cases = {
        "pairformer": (build_pairformer(2).eval(), pairformer_inputs(N)),
        "msa": (build_msa().eval(), msa_inputs()),
    }
    for name, (model, inputs) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = parallelize(model, mesh, example_inputs=inputs)
        with torch.no_grad():
            ref = model(*inputs)
            leaves, spec = tree_flatten(inputs)
            tags = iter(pm.input_tags)
            dt_leaves = [_as_dtensor(l, next(tags), mesh, N, S) if isinstance(l, torch.Tensor) else l for l in leaves]
            dt_inputs = tree_unflatten(dt_leaves, spec)
            out = pm(*dt_inputs, output="dtensor")
            full_in = pm(*dt_inputs)  # DTensors in, full tensors out
        refs = ref if isinstance(ref, tuple) else (ref,)
        outs = out if isinstance(out, tuple) else (out,)
        fulls = full_in if isinstance(full_in, tuple) else (full_in,)
        res[name] = {
            "is_dtensor": [isinstance(o, DTensor) for o in outs],
            "placements": [str(o.placements) if isinstance(o, DTensor) else None for o in outs],
            "shape_ok": [tuple(o.shape) == tuple(r.shape) for o, r in zip(outs, refs)],
            "err": [float((o.full_tensor() - r).abs().max()) for o, r in zip(outs, refs)],
            "err_full_out": [float((f - r).abs().max()) for f, r in zip(fulls, refs)],
            "scale": [float(r.abs().max()) for r in refs],
        }
    return res


@pytest.mark.parametrize("world,train", [(4, True), (9, False)])
def test_msa_module_parity(world, train):
    res = run_distributed(msa_parity_worker, world, train, timeout=300)
    for rank, r in enumerate(res):
        assert r["same_keys"] and r["missing"] == [], r
        assert r["actions"] == {"": "op"}, r["actions"]  # MSAModule ran as the 2D op, not gathered
        assert r["moved"] > 1e-1  # the reference really changed z
        assert r["out_err"] <= 1e-5 * r["scale"], (world, rank, r["out_err"], r["scale"])
        assert r["grad_err"] < 1e-4, (world, rank, r["grad_err"], r["worst"])


@pytest.mark.parametrize("world", [4, 9])
def test_dtensor_in_out(world):
    res = run_distributed(dtensor_worker, world, timeout=300)
    for rank, r in enumerate(res):
        for name, c in r.items():
            assert all(c["is_dtensor"]) and all(c["shape_ok"]), (name, c)
            for e, ef, s in zip(c["err"], c["err_full_out"], c["scale"]):
                assert e <= 1e-5 * s and ef <= 1e-5 * s, (world, rank, name, c)
        assert r["pairformer"]["placements"][1] == "(Shard(dim=1), Shard(dim=2))"
