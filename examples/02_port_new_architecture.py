"""Port a new AF3-like architecture to 2D context parallelism.

Two ways, both shown here on a small trunk whose classes autocp has never seen:

1. **No registration**: ``autocp.parallelize`` runs the model's captured ATen graph through
   one rule table (``docs/shard.md``): every op is proven tile-local, redistributed, run as
   a ring, or gathered exactly. Triangle multiplications (a contraction over a token axis
   between two pair tensors) and triangle attentions (a softmax over a token axis of q.k +
   pair bias) are recognised by what they compute, whatever the spelling, and run on the
   Cannon ring / the ring attention; ``explain()`` lists each ring with its source line. An
   op that still needs a whole pair tensor gathers it (exact, warned) -- ``strict=True``
   makes that an error.
2. **register_module**: bind your class to a 2D op. Here ``MyTriMul`` has Boltz's
   submodules (norm_in, p_in, g_in, norm_out, p_out, g_out), so autocp's
   ``TriangleMultiplication2D(module, mesh, direction=...)`` runs it distributed.

    python examples/02_port_new_architecture.py            # 1 process (1x1)
    python examples/02_port_new_architecture.py --world 4  # 2x2 gloo mesh on CPU
"""

import argparse

import torch
from torch import nn

from autocp.api import parallelize
from autocp.registry import register_module


class MyTriMul(nn.Module):
    """Triangle multiplication written with permute + matmul (not Boltz's einsum)."""

    def __init__(self, dim, outgoing=True):
        super().__init__()
        self.outgoing = outgoing
        self.norm_in = nn.LayerNorm(dim)
        self.p_in = nn.Linear(dim, 2 * dim, bias=False)
        self.g_in = nn.Linear(dim, 2 * dim, bias=False)
        self.norm_out = nn.LayerNorm(dim)
        self.p_out = nn.Linear(dim, dim, bias=False)
        self.g_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, mask):
        x = self.norm_in(x)
        x_in = x
        x = self.p_in(x) * self.g_in(x).sigmoid() * mask.unsqueeze(-1)
        a, b = torch.chunk(x.float(), 2, dim=-1)
        if self.outgoing:  # out[i, j] = sum_k a[i, k] b[j, k]
            o = torch.matmul(a.permute(0, 3, 1, 2), b.permute(0, 3, 2, 1)).permute(0, 2, 3, 1)
        else:  # out[i, j] = sum_k a[k, i] b[k, j]
            o = torch.matmul(a.permute(0, 3, 2, 1), b.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.p_out(self.norm_out(o)) * self.g_out(x_in).sigmoid()


class MyOutgoing(MyTriMul):
    def __init__(self, dim):
        super().__init__(dim, outgoing=True)


class MyIncoming(MyTriMul):
    def __init__(self, dim):
        super().__init__(dim, outgoing=False)


class MyTrunk(nn.Module):
    def __init__(self, dim=8, blocks=2):
        super().__init__()
        self.outs = nn.ModuleList([MyOutgoing(dim) for _ in range(blocks)])
        self.ins = nn.ModuleList([MyIncoming(dim) for _ in range(blocks)])
        self.ff = nn.ModuleList([nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(blocks)])

    def forward(self, pair, pair_mask):
        for o, i, f in zip(self.outs, self.ins, self.ff):
            pair = pair + o(pair, pair_mask)
            pair = pair + i(pair, pair_mask)
            pair = pair + f(pair)
        return pair


def make(n=7, dim=8, seed=0):
    torch.manual_seed(seed)
    model = MyTrunk(dim)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    z = torch.randn(1, n, n, dim)
    mask = torch.ones(1, n, n)
    return model, (z, mask)


def register():
    from autocp.ops.triangle_mult import TriangleMultiplication2D

    register_module(MyOutgoing, lambda m, mesh: TriangleMultiplication2D(m, mesh, direction="outgoing"),
                    kind="triangle_mult_out", call="pair")
    register_module(MyIncoming, lambda m, mesh: TriangleMultiplication2D(m, mesh, direction="incoming"),
                    kind="triangle_mult_in", call="pair")


def run(rank, world):
    import autocp
    from autocp.ops.common import sync_grads

    mesh = autocp.init_mesh()
    model, inputs = make()
    ref = model(*inputs)
    # 1. no registration: the triangle contractions run on the rings (no gather, strict passes)
    pm = parallelize(model, mesh, example_inputs=inputs, strict=True)
    rings = [f"{nt.detail}  <- {nt.source}" for nt in pm.report.glue.notes if nt.what == "ring"]
    # the porting check: the first node whose tiles diverge from the single-device values
    # (none here), with its source line -- run it whenever a port's outputs differ
    report = str(autocp.check(pm, *inputs))
    # 2. registered: every MyTriMul runs as TriangleMultiplication2D
    register()
    pm = parallelize(model, mesh, example_inputs=inputs, strict=True)
    out = pm(*inputs)
    out.sum().backward()
    sync_grads(pm, mesh)
    return {
        "rings": rings,
        "check": report,
        "explain": pm.explain(),
        "max_err": float((out - ref).abs().max()),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=1)
    args = ap.parse_args()
    if args.world == 1:
        res = run(0, 1)
    else:
        from autocp.testing import run_distributed

        res = run_distributed(run, args.world)[0]
    print("rings without registration (each repeated block's program once):")
    for line in res["rings"]:
        print(f"  {line}")
    print("\n" + res["check"])
    print("\nafter register_module:\n" + res["explain"])
    print(f"\nmax |parallel - original| = {res['max_err']:.2e}")


if __name__ == "__main__":
    main()
