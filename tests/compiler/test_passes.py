"""Single-process tests of the compiler passes: trace, claims, the sharding pass's layouts and
notes (the one propagator), explain, errors."""

import warnings

import pytest
import torch
from torch import nn

from autocp.api import estimate, explain, parallelize
from autocp.passes.shard import ShardingError
from autocp.passes.tags import infer_input_layouts, layout_name
from autocp.passes.trace import OPAQUE_OP, CaptureError, capture
from tests.compiler._workers import build_pairformer, pairformer_inputs
from autocp.passes.record import rec


def _opaque_paths(gm):
    return [rec(n).opaque.path for n in gm.graph.nodes if n.op == "call_function" and n.target is OPAQUE_OP]


def test_trace_blocks_captured_once_and_registered_modules_opaque():
    m = build_pairformer(2, blocks=3).eval()  # eval: Boltz's chunked triangle attention
    inputs = pairformer_inputs(6)
    cap = capture(m, inputs)
    assert list(cap.blocks) == ["layers.0[x3]"]
    blk = cap.blocks["layers.0[x3]"]
    assert blk.paths == ["layers.0", "layers.1", "layers.2"]
    # the top graph: one opaque node per block instance
    assert _opaque_paths(cap.top) == ["layers.0", "layers.1", "layers.2"]
    # the block graph: each registered module is ONE node carrying its path
    assert sorted(_opaque_paths(blk.gm)) == sorted(
        f"layers.0.{x}" for x in ("tri_mul_out", "tri_mul_in", "tri_att_start", "tri_att_end", "attention",
                                  "transition_z", "transition_s"))
    # nothing of the registered modules' insides was captured
    stacks = [str(n.meta.get("nn_module_stack", "")) for n in blk.gm.graph.nodes]
    assert not any("mha" in s or "p_in" in s for s in stacks)
    assert capture(m, inputs) is cap  # cached by input signature
    assert capture(m, pairformer_inputs(7)) is not cap


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, z):
        if z.sum() > 0:
            return self.lin(z)
        return z


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = DataDependent()

    def forward(self, z):
        return self.inner(z)


def test_untraceable_model_error_names_module_construct_and_fix():
    with pytest.raises(CaptureError) as ei:
        capture(Outer(), (torch.randn(1, 5, 5, 4),))
    msg = str(ei.value)
    assert "inner (DataDependent)" in msg
    assert "if z.sum() > 0:" in msg
    assert "Fix" in msg and "torch.where" in msg


def _notes(pm, what=None):
    return [nt for nt in pm.report.glue.notes if what is None or nt.what == what]


def test_propagated_layouts_of_boltz_block():
    """The sharding pass's tags are the layouts: the block's outputs, the boundary layouts of
    each registered module as the glue hands them over, and no gather in the glue."""
    m = build_pairformer(2, blocks=2).train()
    inputs = pairformer_inputs(7)
    tags, n = infer_input_layouts(list(inputs))
    assert n == 7 and [layout_name(t) for t in tags] == ["RowToken", "Pair2D", "RowToken", "Pair2D"]
    pm = parallelize(m, None, example_inputs=inputs)
    assert [layout_name(t) for t in pm.output_tags] == ["RowToken", "Pair2D"]
    assert not [nt for nt in _notes(pm) if nt.what in ("gather", "op-gather")]
    row = next(r for r in pm.report.rows if r.path == "layers.1.attention")
    assert row.in_layouts == "RowToken, Pair2D, RowToken, RowToken" and row.out_layouts == "RowToken"


def _af3like():
    from tests.compiler.af3like import Trunk

    torch.manual_seed(0)
    m = Trunk()
    n = 7
    z, s = torch.randn(1, n, n, 8), torch.randn(1, n, 8)
    mask = torch.ones(1, n)
    return m, (z, s, mask, mask[:, :, None] * mask[:, None, :])


def test_triangle_ops_recognised_in_a_foreign_spelling():
    """af3like's triangle updates (matmul + permutes) and attentions (masked_fill, the ending
    node transposed outside the module) run as rings with no registration; its pair-bias
    attention over token tensors runs as a distributed softmax + contraction."""
    m, inputs = _af3like()
    pm = parallelize(m, None, example_inputs=inputs, strict=True)
    assert pm.plan.actions == {}  # nothing registered: every op is the rule table's
    rings = sorted(nt.detail.split(" (")[0].split(":")[0] for nt in _notes(pm, "ring"))
    assert rings == ["triangle attention", "triangle attention", "triangle contraction over token letter 'K'",
                     "triangle contraction over token letter 'K'"], rings
    details = " ".join(nt.detail for nt in _notes(pm, "ring"))
    assert "outgoing" in details and "incoming" in details and "starting node" in details and "ending node" in details
    assert not [nt for nt in _notes(pm) if nt.what in ("gather", "op-gather")]
    ref = m(*inputs)
    for a, b in zip(pm(*inputs), ref):
        assert torch.allclose(a, b, atol=1e-5)


class _SortsTokens(nn.Module):
    def forward(self, z):
        return z.sort(dim=1).values + z


def test_strict_refuses_a_pair_gather_and_default_warns():
    z = torch.randn(1, 7, 7, 4)
    with pytest.raises(ShardingError) as ei:
        parallelize(_SortsTokens(), None, example_inputs=(z,), strict=True)
    msg = str(ei.value)
    assert "aten.sort" in msg and "two sharded axes" in msg and "Fix" in msg and "strict=False" in msg
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        pm = parallelize(_SortsTokens(), None, example_inputs=(z,))
    assert [w for w in wl if "gather a pair tensor" in str(w.message)]
    torch.testing.assert_close(pm(z), _SortsTokens()(z))


def test_explain_lists_every_triangle_op_of_4_block_pairformer(tmp_path):
    m = build_pairformer(2, blocks=4)
    inputs = pairformer_inputs(7)
    pm = parallelize(m, None, example_inputs=inputs)
    text = explain(pm)
    rep = pm.report
    for i in range(4):
        for name, kind, cls in (("tri_mul_out", "triangle_mult_out", "TriangleMultiplicationOutgoing"),
                                ("tri_mul_in", "triangle_mult_in", "TriangleMultiplicationIncoming"),
                                ("tri_att_start", "triangle_attn_start", "TriangleAttention"),
                                ("tri_att_end", "triangle_attn_end", "TriangleAttentionEndingNode")):
            path = f"layers.{i}.{name}"
            row = next(r for r in rep.rows if r.path == path)
            assert row.kind == kind and row.rule == f"registry:{cls}" and row.action == "op"
            assert row.in_layouts == "Pair2D, Pair2D" and row.out_layouts == "Pair2D"
            line = next(l for l in text.splitlines() if l.startswith(path + " "))
            assert kind in line and f"registry:{cls}" in line and "Pair2D" in line
    assert len(rep.by_kind("pair_bias_attn")) == 4
    assert "repeated blocks captured once: layers.0[x4]" in text
    rep.to_graphml(str(tmp_path / "g.graphml"))
    assert (tmp_path / "g.graphml").stat().st_size > 1000
    assert "digraph" in rep.to_dot()
    mem = pm.explain(memory=True)
    assert "estimated per-rank peak memory" in mem


def test_state_dict_and_sharing_one_process():
    m = build_pairformer(1, blocks=2)
    inputs = pairformer_inputs(6)
    pm = parallelize(m, None, example_inputs=inputs)
    assert list(pm.state_dict()) == list(m.state_dict())
    assert all(a is b for a, b in zip(pm.parameters(), m.parameters()))
    pm.load_state_dict(m.state_dict())
    ref = m(*inputs)
    out = pm(*inputs)
    for a, b in zip(out, ref):
        assert (a - b).abs().max() < 1e-5
    assert (ref[1] - inputs[1]).abs().max() > 1e-1  # the layers really do something


def test_estimate_bad_mesh_and_fit():
    m = build_pairformer(2, blocks=1)
    from autocp.mesh import MeshError

    with pytest.raises(MeshError):
        estimate(m, n_tokens=16, mesh_shape=(2, 3))
    with pytest.raises(MeshError):
        estimate(m, n_tokens=2, mesh_shape=(3, 3))
    e1 = estimate(m, n_tokens=24, mesh_shape=(1, 1))
    e4 = estimate(m, n_tokens=24, mesh_shape=(2, 2))
    assert e4.peak_bytes < e1.peak_bytes
    fit = estimate(m, n_tokens=24, mesh_shape=(1, 1), device_bytes=(e1.peak_bytes + e4.peak_bytes) // 2)
    assert fit.fits == (2, 2)


def test_register_module_binds_custom_class_to_2d_op():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "02_port_new_architecture.py")
    spec = importlib.util.spec_from_file_location("ex02", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    model, inputs = ex.make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unregistered: its contractions run as rings, not gathered
        pm = parallelize(model, None, example_inputs=inputs, strict=True)
    assert pm.plan.actions == {}
    dirs = sorted(nt.detail.split("(")[1].split(",")[0] for nt in _notes(pm, "ring"))
    assert dirs == ["incoming", "outgoing"], dirs  # one program per repeated block: each once
    torch.testing.assert_close(pm(*inputs), model(*inputs))
    ex.register()
    pm = parallelize(model, None, example_inputs=inputs, strict=True)
    acts = {p: a.action for p, a in pm.plan.actions.items()}
    assert acts == {"outs.0": "op", "outs.1": "op", "ins.0": "op", "ins.1": "op"}
    from autocp.ops.triangle_mult import TriangleMultiplication2D

    assert isinstance(pm.inner.outs[0].op, TriangleMultiplication2D)
    assert (pm(*inputs) - model(*inputs)).abs().max() < 1e-5


class _UnpackedStack(nn.Module):
    """alphafold3-pytorch's spelling: each layer is ``ModuleList([pair, single])``, unpacked
    by the stack (``for pair, single in self.layers``), never called as one module."""

    def __init__(self, depth=3, c=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList([nn.Linear(c, c), nn.Linear(c, c)]) for _ in range(depth))

    def forward(self, s, z):
        for pair, single in self.layers:
            z = z + pair(z)
            s = s + single(s)
        return s, z


def test_blocks_inside_unpacked_layer_lists_are_grouped_by_position():
    m = _UnpackedStack()
    s, z = torch.randn(1, 5, 4), torch.randn(1, 5, 5, 4)
    cap = capture(m, (s, z))  # was: "cannot unpack non-iterable Recorder object"
    assert sorted(cap.blocks) == ["layers.0.0[x3]", "layers.0.1[x3]"]
    assert cap.blocks["layers.0.0[x3]"].paths == ["layers.0.0", "layers.1.0", "layers.2.0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = parallelize(m, None, example_inputs=(s, z))
    for a, b in zip(pm(s, z), m(s, z)):
        torch.testing.assert_close(a, b)
