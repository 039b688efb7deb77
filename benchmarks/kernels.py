#!/usr/bin/env python
"""Tile kernels: correctness + timings of the torch reference vs the Triton kernels.

    python benchmarks/kernels.py                 # whatever device is present
    python benchmarks/kernels.py --sizes 256 512 1024 --rows 256 --iters 20

On CUDA (bf16 inputs, fp32 accumulation) for tile sizes b = 256..1024:

* ``tri_attn``  -- triangle attention tile ``q/k/v [1, I, H=4, b, 32]``, learned bias
  ``[1, 1, H, b, b]`` (broadcast over the I rows), ``key_valid [1, I, 1, b]`` (some
  keys invalid). ``I = min(b, --rows)`` query rows of the tile (time is linear in I).
* ``pb_attn``   -- pair-bias attention tile ``q/k/v [1, H=16, b, 24]``, bias ``[1, H, b, b]``.
* ``tri_mm``    -- the triangle-multiplication GEMM ``[C=128, b, b] @ [C, b, b]^T``.

Implementations: ``torch-reference`` (autocp.kernels.reference), ``triton`` (this repo),
plus -- only where importable -- ``torch-sdpa`` (F.scaled_dot_product_attention with the
bias as attn_mask, a strong torch baseline, no LSE), ``cuequivariance_torch`` and
``trifast`` triangle attention (autograd fwd+bwd), and a bf16 ``torch.matmul`` for tri_mm.
Reports median fwd and fwd+bwd times (CUDA events), the peak memory above the inputs
(``torch.cuda.max_memory_allocated``) and the max abs error vs the reference.

On CPU: tiny shapes (H=2, C=4, b = 24, 40); only the reference is timed. The Triton kernels run in the
interpreter for correctness only (``interpreter, not timed``); this script turns the
interpreter on itself when there is no CUDA (it must be set before triton imports).

Prints a table and writes JSON (default ``benchmarks/results/kernels.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:  # interpreter for the CPU correctness check
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("AUTOCP_TRITON_INTERPRET", "1")

from autocp import kernels  # noqa: E402,F401  (registers the implementations)
from autocp.kernels import reference as R  # noqa: E402
from autocp.testing import median_ms  # noqa: E402

try:
    from autocp.kernels import triton_impl as T  # noqa: E402
except ImportError as e:  # triton missing
    T = None
    TRITON_ERR = f"triton not importable: {e}"
else:
    TRITON_ERR = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = "cuda" if CUDA else "cpu"


# ---------------------------------------------------------------------------- timing
def _sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, iters, warmup):
    """Median milliseconds of ``fn()``."""
    return median_ms(fn, iters=iters, warmup=warmup)


def peak_mb(fn):
    """Peak memory allocated by one ``fn()`` above what was allocated before (CUDA only)."""
    if not CUDA:
        return None
    _sync()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    _sync()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return round(peak / 2**20, 1)


def maxerr(got, ref):
    got, ref = got.float(), ref.float()
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(got)):
        return float("inf")
    return (got[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


# ---------------------------------------------------------------------------- cases
def make_tri_attn(b, rows, dtype, H=4 if CUDA else 2, D=32 if CUDA else 16):
    g = torch.Generator(device=DEV).manual_seed(b)
    I = min(b, rows)
    q, k, v = (torch.randn(1, I, H, b, D, device=DEV, generator=g).to(dtype) for _ in range(3))
    bias = torch.randn(1, 1, H, b, b, device=DEV, generator=g).to(dtype)
    kv = torch.rand(1, I, 1, b, device=DEV, generator=g) > 0.1
    kv[..., 0] = True
    return dict(q=q, k=k, v=v, bias=bias, key_valid=kv, scale=D ** -0.5), f"q[1,{I},{H},{b},{D}] bias[1,1,{H},{b},{b}]"


def make_pb_attn(b, rows, dtype, H=16 if CUDA else 2, D=24):
    g = torch.Generator(device=DEV).manual_seed(b + 1)
    q, k, v = (torch.randn(1, H, b, D, device=DEV, generator=g).to(dtype) for _ in range(3))
    bias = torch.randn(1, H, b, b, device=DEV, generator=g).to(dtype)
    kv = torch.ones(b, dtype=torch.bool, device=DEV)
    kv[-3:] = False  # padding keys
    return dict(q=q, k=k, v=v, bias=bias, key_valid=kv, scale=D ** -0.5), f"q[1,{H},{b},{D}] bias[1,{H},{b},{b}]"


def attn_impls(x):
    """name -> (fwd(), fwdbwd()) closures; fwd returns the comparable output."""
    q, k, v, bias, kv, sc = x["q"], x["k"], x["v"], x["bias"], x["key_valid"], x["scale"]
    g = torch.Generator(device=DEV).manual_seed(0)
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device=DEV, generator=g)

    def ours(fwd, bwd):
        def f():
            return fwd(q, k, v, bias, kv, sc)[0]

        def fb():
            out, lse = fwd(q, k, v, bias, kv, sc)
            delta = (dout * out).sum(-1)
            return bwd(q, k, v, bias, kv, sc, lse, dout, delta)

        return f, fb

    impls = {"torch-reference": ours(R.tile_attention_fwd, R.tile_attention_bwd)}
    impls["triton"] = ours(T.tile_attention_fwd, T.tile_attention_bwd) if T is not None else TRITON_ERR

    def autograd_impl(call):
        def f():
            with torch.no_grad():
                return call(q, k, v)

        def fb():
            qa, ka, va = (t.detach().requires_grad_() for t in (q, k, v))
            out = call(qa, ka, va)
            out.float().backward(dout.to(out.dtype))
            return qa.grad

        return f, fb

    if CUDA:
        neg = torch.finfo(torch.float32).min
        mask_bias = torch.where(kv, 0.0, neg).unsqueeze(-2)  # [..., 1, K]

        def sdpa(qa, ka, va):
            m = (bias.float() + mask_bias).to(q.dtype)
            shape = torch.broadcast_shapes(qa.shape[:-2], m.shape[:-2])
            qf, kf, vf = (t.expand(*shape, *t.shape[-2:]).reshape(-1, *t.shape[-2:]).unsqueeze(0) for t in (qa, ka, va))
            mf = m.expand(*shape, *m.shape[-2:]).reshape(-1, *m.shape[-2:]).unsqueeze(0)
            o = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=mf, scale=sc)
            return o.reshape(*qa.shape[:-1], va.shape[-1])

        impls["torch-sdpa"] = autograd_impl(sdpa)
        if q.dim() == 5:  # triangle layout [B, I, H, Q, D]
            try:
                import cuequivariance_torch as cuet

                mask5 = kv.unsqueeze(-2)  # [B, I, 1, 1, K]
                impls["cuequivariance_torch"] = autograd_impl(
                    lambda qa, ka, va: cuet.triangle_attention(qa, ka, va, bias.float(), mask5, sc))
            except Exception as e:  # noqa: BLE001
                impls["cuequivariance_torch"] = f"not importable: {type(e).__name__}: {e}"[:160]
            try:
                from trifast import triangle_attention as tf_attn

                B, I, H, Q, D = q.shape
                if I != Q:
                    raise RuntimeError(f"trifast needs a square tile (I={I} != Q={Q}); use --rows >= b")
                tmask = ~kv[:, :, 0, :]  # [B, I, K], True = masked out

                def trif(qa, ka, va):
                    tr = lambda t: t.permute(0, 2, 1, 3, 4)  # noqa: E731  [B, H, I, Q, D]
                    o = tf_attn(tr(qa * sc), tr(ka), tr(va), bias[:, 0], tmask)
                    return o.permute(0, 2, 1, 3, 4)

                impls["trifast"] = autograd_impl(trif)
            except Exception as e:  # noqa: BLE001
                impls["trifast"] = f"not usable: {type(e).__name__}: {e}"[:160]
    return impls


def make_tri_mm(b, rows, dtype, C=128 if CUDA else 4):
    g = torch.Generator(device=DEV).manual_seed(b + 2)
    a = torch.randn(C, b, b, device=DEV, generator=g).to(dtype)
    bb = torch.randn(C, b, b, device=DEV, generator=g).to(dtype)
    return dict(a=a, b=bb), f"[{C},{b},{b}]x[{C},{b},{b}]^T"


def tri_mm_impls(x):
    a, b = x["a"], x["b"]
    g = torch.randn(a.shape[0], a.shape[1], b.shape[1], device=DEV)

    def ours(mm):
        def f():
            return mm(a, b)

        def fb():  # forward + backward as tri_mm calls: da = g @ b, db = g^T @ a
            out = mm(a, b)
            da = mm(g, b.transpose(-1, -2))
            db = mm(g.transpose(-1, -2), a.transpose(-1, -2))
            return out, da, db

        return f, fb

    impls = {"torch-reference": ours(R.tri_mm)}
    impls["triton"] = ours(T.tri_mm) if T is not None else TRITON_ERR
    if CUDA and a.dtype != torch.float32:
        impls["torch-matmul (bf16 out)"] = ours(lambda x_, y_: torch.matmul(x_, y_.to(x_.dtype).transpose(-1, -2)))
        impls["cuequivariance_torch"] = ("triangle_multiplicative_update is a whole layer (projections, gating), "
                                         "not comparable to the tile GEMM: not timed")
    return impls


OPS = {
    "tri_attn": (make_tri_attn, attn_impls),
    "pb_attn": (make_pb_attn, attn_impls),
    "tri_mm": (make_tri_mm, tri_mm_impls),
}


def run(args):
    dtype = torch.bfloat16 if CUDA else torch.float32
    rows = []
    for op in args.ops:
        make, get_impls = OPS[op]
        for b in args.sizes:
            x, shape = make(b, args.rows, dtype)
            impls = get_impls(x)
            ref_f, _ = impls["torch-reference"]
            ref_out = ref_f()
            for name, fns in impls.items():
                row = dict(op=op, b=b, shape=shape, dtype=str(dtype).split(".")[-1], impl=name,
                           fwd_ms=None, fwdbwd_ms=None, peak_fwd_mb=None, peak_fwdbwd_mb=None, max_err=None, note="")
                rows.append(row)
                if isinstance(fns, str):
                    row["note"] = fns
                    continue
                f, fb = fns
                interp = name == "triton" and T is not None and T.INTERPRET
                try:
                    out = f()
                    row["max_err"] = maxerr(out, ref_out)
                    if interp:
                        fb()  # runs the backward once (correctness of the fwd+bwd path is in tests/kernels)
                        row["note"] = "interpreter, not timed"
                        continue
                    row["fwd_ms"] = round(timed(f, args.iters, args.warmup), 4)
                    row["fwdbwd_ms"] = round(timed(fb, args.iters, args.warmup), 4)
                    row["peak_fwd_mb"] = peak_mb(f)
                    row["peak_fwdbwd_mb"] = peak_mb(fb)
                except Exception as e:  # noqa: BLE001 -- record and go on (e.g. OOM of a baseline)
                    row["note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                    if args.verbose:
                        traceback.print_exc()
                    if CUDA:
                        torch.cuda.empty_cache()
            del x, impls, ref_out
            if CUDA:
                torch.cuda.empty_cache()
    # speed ratios vs the reference
    for r in rows:
        ref = next((s for s in rows if s["op"] == r["op"] and s["b"] == r["b"] and s["impl"] == "torch-reference"), None)
        for key in ("fwd_ms", "fwdbwd_ms"):
            if ref and r[key] and ref[key]:
                r[key.replace("_ms", "_speedup_vs_ref")] = round(ref[key] / r[key], 2)
    return rows


def table(rows):
    hdr = f"{'op':9} {'b':>5} {'impl':26} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x ref':>11} {'peak MB f/fb':>17} {'max err':>9}  note"
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        fm = f"{r['fwd_ms']:.3f}" if r["fwd_ms"] is not None else "-"
        fbm = f"{r['fwdbwd_ms']:.3f}" if r["fwdbwd_ms"] is not None else "-"
        sp = (f"{r.get('fwd_speedup_vs_ref', '-')}/{r.get('fwdbwd_speedup_vs_ref', '-')}"
              if r["fwd_ms"] is not None else "-")
        pk = f"{r['peak_fwd_mb']}/{r['peak_fwdbwd_mb']}" if r["peak_fwd_mb"] is not None else "-"
        er = f"{r['max_err']:.2e}" if r["max_err"] is not None else "-"
        lines.append(f"{r['op']:9} {r['b']:>5} {r['impl'][:26]:26} {fm:>9} {fbm:>11} {sp:>11} {pk:>17} {er:>9}  {r['note']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024] if CUDA else [24, 40])
    ap.add_argument("--rows", type=int, default=256 if CUDA else 2, help="query rows I of the triangle tile")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--iters", type=int, default=20 if CUDA else 5)
    ap.add_argument("--warmup", type=int, default=3 if CUDA else 1)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kernels.json"))
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = run(args)
    meta = dict(
        device=torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or platform.machine()})",
        torch=torch.__version__,
        triton=getattr(sys.modules.get("triton"), "__version__", None),
        triton_mode=("interpreter (correctness only)" if T is not None and T.INTERPRET else
                     "compiled" if T is not None else TRITON_ERR),
        dtype="bfloat16" if CUDA else "float32",
        args=vars(args),
        wall_s=round(time.time() - t0, 1),
        note=("max_err: max abs difference to torch-reference on the same inputs (reference computes in fp32); "
              "x ref: reference time / impl time (fwd/fwd+bwd); peak MB: max_memory_allocated above the inputs"),
    )
    print(f"device: {meta['device']}  torch {meta['torch']}  triton {meta['triton']} ({meta['triton_mode']})")
    print(table(rows))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(meta=meta, results=rows), fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
