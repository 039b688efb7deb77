"""OpInfo-driven differential sweep of the sharding rules (like PyTorch's
``test/distributed/tensor/test_dtensor_ops.py``).

The cases come from PyTorch's own operator database (``op_db`` of
``torch.testing._internal.common_methods_invocations``): every elementwise unary and
binary ufunc and every reduction with a float32 implementation. Each is applied to a pair
tensor ``z[1, N, N, C]`` (N=7, not divisible by 2 or 3) the way AF3 glue applies it:

* unary: ``op(x)`` with ``x`` mapped into the op's domain, extra non-tensor arguments
  from the OpInfo's first sample input;
* binary: ``op(x, y)`` with ``y`` built from ``z`` *transposed* plus a column-token
  reduction broadcast back (a transpose exchange and an all-reduce on the mesh);
* reduction: ``op(x, dim=1)`` (over the row-token axis).

All cases run as ONE tile program (one input and one output per case, so every case has
its own gradient) on the mesh and are compared with the single-device op, forward and
input gradients. Cases are built in the test process (importing op_db costs ~4 s) and
shipped to the ranks as ``(label, kind, fn, args, kwargs, domain, grad)`` tuples.
"""

from __future__ import annotations

import torch

N, C = 7, 4


def _domain_map(z, domain):
    lo, hi = domain if domain else (None, None)
    if lo is not None and hi is not None:
        return lo + (hi - lo) * (0.05 + 0.9 * torch.sigmoid(z))
    if lo is not None:
        return lo + 0.1 + torch.nn.functional.softplus(z)
    if hi is not None:
        return hi - 0.1 - torch.nn.functional.softplus(z)
    return z


def apply_case(case, z):
    """One case on one pair tensor (the same python on one device and on the tiles)."""
    _label, kind, fn, args, kwargs, domain, _grad = case
    x = _domain_map(z, domain)
    if kind == "unary":
        return fn(x, *args, **kwargs)
    if kind == "binary":
        y = 0.5 + torch.sigmoid(z.transpose(1, 2) + z.mean(dim=1, keepdim=True))
        return fn(x, y, *args, **kwargs)
    out = fn(x, *args, dim=1, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class OpInfoProgram(torch.nn.Module):
    def __init__(self, cases):
        super().__init__()
        self.cases = list(cases)

    def forward(self, *zs):
        return tuple(apply_case(c, z) for c, z in zip(self.cases, zs))


def _plain(v):
    return not isinstance(v, torch.Tensor) and not (isinstance(v, (list, tuple)) and any(isinstance(a, torch.Tensor) for a in v))


def build_cases():
    """``(cases, skipped)``: the runnable cases and ``{label: why}`` for the OpInfos left out."""
    import pickle

    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.opinfo.core import BinaryUfuncInfo, ReductionOpInfo, UnaryUfuncInfo

    cases, skipped, seen = [], {}, set()
    z = torch.randn(1, N, N, C, generator=torch.Generator().manual_seed(0))
    for op in op_db:
        kind = ("unary" if isinstance(op, UnaryUfuncInfo) else "binary" if isinstance(op, BinaryUfuncInfo)
                else "reduction" if isinstance(op, ReductionOpInfo) else None)
        if kind is None:
            continue
        label = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        if label in seen:
            continue
        seen.add(label)
        if torch.float32 not in op.dtypes:
            skipped[label] = "no float32 implementation"
            continue
        args, kwargs = (), {}
        if kind == "unary":
            sample = next(iter(op.sample_inputs("cpu", torch.float32)), None)
            if sample is not None:
                args, kwargs = tuple(sample.args), dict(sample.kwargs)
                if not (all(_plain(a) for a in args) and all(_plain(v) for v in kwargs.values())):
                    skipped[label] = "needs tensor arguments beyond the input"
                    continue
        domain = tuple(getattr(op, "domain", (None, None)) or (None, None))
        if op.name in ("pow", "float_power", "__rpow__", "__rdiv__"):
            # positive base / nonzero divisor: a tile's pad slots hold zeros (like the model's own
            # padded tokens), where y / x has an infinite derivative -- see docs/shard.md "Padding"
            domain = (0.5, 2.0)
        case = (label, kind, op.op, args, kwargs, domain, bool(op.supports_autograd))
        try:
            pickle.dumps(case)
        except Exception:  # noqa: BLE001
            skipped[label] = "its callable is not picklable (cannot ship it to the ranks)"
            continue
        try:
            out = apply_case(case, z)
        except Exception as e:  # noqa: BLE001
            skipped[label] = f"does not take this form on one device: {type(e).__name__}"
            continue
        if not isinstance(out, torch.Tensor) or out.is_complex() or out.dtype in (torch.float16, torch.bfloat16):
            skipped[label] = "not a real float32/bool/int tensor result"
            continue
        if out.dtype.is_floating_point and case[-1]:
            try:
                zz = z.clone().requires_grad_(True)
                apply_case(case, zz).sum().backward()
            except Exception:  # noqa: BLE001
                case = case[:-1] + (False,)
        else:
            case = case[:-1] + (False,)
        cases.append(case)
    return cases, skipped


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    fin = torch.isfinite(b)
    if not torch.equal(fin, torch.isfinite(a)):
        return float("inf")
    if not fin.any():
        return 0.0
    return float((a[fin] - b[fin]).abs().max() / (b[fin].abs().max() + 1e-12))


def opinfo_worker(rank, world, cases):
    """Per case: (output rel. error, input-gradient rel. error or None, gathered a pair tensor)."""
    import torch.distributed as dist

    import autocp
    from autocp.passes.program import compile_tile_program, run_tile_program

    mesh = autocp.init_mesh()
    tags = (None, "r", "c", None)
    g = torch.Generator().manual_seed(0)
    z0 = [torch.randn(1, N, N, C, generator=g) for _ in cases]
    m = OpInfoProgram(cases)
    zs = [z.clone().requires_grad_(True) for z in z0]
    refs = m(*zs)
    ws = [torch.randn(r.shape, generator=torch.Generator().manual_seed(1 + i)) for i, r in enumerate(refs)]
    loss = sum((r * w).sum() for r, w, c in zip(refs, ws, cases) if c[-1])
    loss.backward()
    rgrads = [z.grad.clone() if z.grad is not None else None for z in zs]
    prog, _ = compile_tile_program(m, tuple(z0), [tags] * len(cases), n=N, p=mesh.p)
    xs = [z.clone().requires_grad_(True) for z in z0]
    outs = run_tile_program(prog, mesh, xs, [tags] * len(cases), N)
    loss = sum((o * w).sum() for o, w, c in zip(outs, ws, cases) if c[-1])
    (loss / mesh.p ** 2).backward()
    pair_ops = sorted({nt.op for nt in prog.notes if nt.pair and nt.what in ("gather", "op-gather")})
    res = {}
    for i, c in enumerate(cases):
        gerr = None
        if c[-1] and rgrads[i] is not None:
            gr = xs[i].grad if xs[i].grad is not None else torch.zeros_like(xs[i])
            if mesh.p > 1:
                dist.all_reduce(gr)
            gerr = _rel(gr, rgrads[i])
        res[c[0]] = (_rel(outs[i].to(refs[i].dtype), refs[i]), gerr)
    return res, pair_ops
