#!/usr/bin/env python
"""One prepared GPU check (<= 8 minutes on one H100 / H200): kernels, one Pairformer block
and one diffusion step of Boltz-2 as ONE RANK's tile program at scale. Writes JSON.

    python benchmarks/gpu_check.py                      # N=30000 on a simulated 8x8 mesh, bf16
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/x.json   # tiny, CPU, < 30 s (tests)

Sections (each in its own try/except: a failing section records its error and the others
still run; the JSON is rewritten after every section, so a killed run keeps what it had).
Run order: pairformer_block, diffusion_step, kernels, diffusion_step_lazy_bias, estimate
(the headline numbers first):

* ``kernels`` -- the tile kernels (:mod:`autocp.kernels`: ``tile_attention_fwd`` /
  ``tile_attention_bwd`` on triangle-attention and pair-bias-attention tiles, ``tri_mm``)
  at moderate shapes: the Triton implementation vs the torch reference on the same inputs
  (max abs / rel error of every output, median ms, peak MiB above the inputs), plus
  ``cuequivariance_torch`` / ``trifast`` triangle attention *only if importable* (never
  installed from here). On CPU only the reference is timed; Triton runs in the interpreter
  (correctness only) when ``TRITON_INTERPRET=1`` was set before starting.
* ``pairformer_block`` -- one Boltz-2 ``PairformerLayer`` (``PairformerModule(num_blocks=1,
  v2=True)``, token_s 384, token_z 128, 16 heads, triangle attention 4 x 32) at
  ``--tokens`` N on a simulated ``--mesh`` p x p mesh: the tile program
  ``autocp.parallelize`` emits (``emit="graph"``), built the way :func:`autocp.estimate`
  builds it (plan at a small N, graph captured at N on FakeTensors, autocp's real 2D ops
  built for rank (0, 1) of ``SquareMesh.simulated(p)``), then run on REAL tiles of that rank
  (``b = ceil(N / p)`` tokens per block) inside :func:`autocp.comm.simulate`: every
  communication primitive allocates its real receive / gather buffers and moves nothing.
  So ``max_memory_allocated`` and the wall time are those of one rank's compute and memory
  (communication time excluded; received buffers hold uninitialised values, outputs are
  not meaningful). ``autocp.chunking`` defaults. bf16: fp32 weights under
  ``torch.autocast(bf16)`` with bf16 inputs and ``pair_dtype=bfloat16`` (Boltz's
  "bf16-mixed", the default of ``autocp.estimate(dtype=bf16)``).
* ``diffusion_step`` -- one call of the Boltz-2 score model's token part, Boltz's own
  ``DiffusionModule`` submodules (token_s 384, token transformer 24 layers x 16 heads at
  width 768, fourier 256, 2 conditioning transitions) run exactly as
  ``DiffusionModule.forward`` runs them (``single_conditioner`` -> ``+ s_to_a_linear(s)``
  -> ``token_transformer(a, mask, s, bias=token_trans_bias.float())`` -> ``a_norm``) with the
  conditioning's ``token_trans_bias`` [B, N, N, 24*16] as a resident Pair2D input tile, as
  the same simulated tile program. The atom attention encoder / decoder are NOT in it
  (see ``not_measured`` in the JSON for the precise reason).
* ``diffusion_step_lazy_bias`` -- the same step with the held conditioned ``z`` tile
  (token_z channels) instead of the resident bias, each layer projecting its own bias
  with Boltz-2's ``DiffusionConditioning.token_trans_proj_z[l]`` when it runs (what
  ``autocp.models.boltz_bias`` does end to end).
* ``estimate`` -- :func:`autocp.estimate` (FakeTensors, CPU) of the same block and step
  configurations, for comparison with the measured peaks (only if time is left).

``--time-budget`` seconds (default 420): no new section (and no further timed repeat)
starts once it is spent; what was skipped is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import torch
from torch import nn

from autocp.testing import median_ms

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

MIB = 2**20
GIB = 2**30

def released_widths() -> tuple:
    """``(pairformer kwargs, diffusion score-model kwargs)`` of one Boltz-2 Pairformer block and
    the score model at the released widths (from :func:`autocp.models.boltz_estimate.released_boltz2_config`)."""
    from autocp.models.boltz_estimate import released_boltz2_config

    cfg = released_boltz2_config()
    pf, sm = cfg["pairformer_args"], cfg["score_model_args"]
    pairformer = dict(token_s=cfg["token_s"], token_z=cfg["token_z"], num_blocks=1, num_heads=pf["num_heads"],
                      pairwise_head_width=pf["pairwise_head_width"], pairwise_num_heads=pf["pairwise_num_heads"],
                      dropout=0.0, v2=True)
    keys = ("sigma_data", "dim_fourier", "atom_encoder_depth", "atom_encoder_heads", "token_transformer_depth",
            "token_transformer_heads", "atom_decoder_depth", "atom_decoder_heads", "conditioning_transition_layers")
    diffusion = dict(token_s=cfg["token_s"], token_z=cfg["token_z"], atom_s=cfg["atom_s"], atom_z=cfg["atom_z"],
                     **{k: sm[k] for k in keys})
    return pairformer, diffusion


#: tiny widths for --cpu-smoke
SMOKE_PAIRFORMER_CFG = dict(token_s=32, token_z=16, num_blocks=1, num_heads=2, pairwise_head_width=8,
                            pairwise_num_heads=2, dropout=0.0, v2=True)
SMOKE_DIFFUSION_CFG = dict(token_s=32, token_z=16, atom_s=16, atom_z=8, sigma_data=16, dim_fourier=32,
                           atom_encoder_depth=1, atom_encoder_heads=2, token_transformer_depth=2,
                           token_transformer_heads=2, atom_decoder_depth=1, atom_decoder_heads=2,
                           conditioning_transition_layers=1)

ATOM_PARTS_NOT_MEASURED = (
    "The score model's AtomAttentionEncoder / AtomAttentionDecoder and the DiffusionConditioning that "
    "produces their inputs (q, c, atom_enc_bias, atom_dec_bias) run in autocp only through the eager "
    "whole-model driver (autocp.models.boltz_e2e.ParallelBoltz with AtomWindowOp), which cannot run as one "
    "rank on a simulated mesh: (1) the atom-pair band of z is moved by autocp.ops.atom_windows.band_gather "
    "with torch.distributed.all_to_all_single called directly (not through autocp.comm), so "
    "autocp.comm.simulate does not cover it -- tried on CPU with tiny_boltz2 on SquareMesh.simulated(2, "
    "(0, 1)): the trunk runs, then DiffusionConditioning's AtomEncoder stops in band_gather with 'Default "
    "process group has not been initialized'; (2) from the source (not run on a GPU here), the atom path "
    "allocates host tensors without a device (torch.zeros in boltz_atoms._token_weights, torch.arange in "
    "boltz_atoms._encode and atom_windows._window_pair_ids), so it would fail on CUDA tensors as written; "
    "(3) its inputs are Boltz features at N tokens (~8 atoms per token, the one-hot atom_to_token "
    "[1, M, N]) that would have to be synthesised per rank. Per rank the atom part is O(M / P) atoms in "
    "32 x 128 windows, small next to the token transformer's O(N^2 / P) pair-bias work measured here.")


# ============================================================================ helpers
class Ctx:
    """Run-wide settings and the time budget."""

    def __init__(self, args):
        self.args = args
        self.smoke = bool(args.cpu_smoke)
        self.cuda = (not self.smoke) and torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        self.low = self.dtype != torch.float32
        self.pair_dtype = self.dtype if self.low else None
        self.n = args.tokens
        self.p = args.mesh
        self.b = -(-self.n // self.p)
        self.t0 = time.time()
        self.deadline = self.t0 + args.time_budget
        self.repeats = args.repeats
        pf, df = (SMOKE_PAIRFORMER_CFG, SMOKE_DIFFUSION_CFG) if self.smoke else released_widths()
        self.pf_cfg, self.df_cfg = dict(pf), dict(df)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.deadline - time.time()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.low)


def _err(got, ref) -> dict:
    """Max abs error and max rel error (abs error / max |ref|) over the finite entries of ref."""
    got, ref = got.detach().float(), ref.detach().float()
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(got)):
        return {"max_abs": float("inf"), "max_rel": float("inf"), "note": "non-finite pattern differs"}
    if not bool(fin.any()):
        return {"max_abs": 0.0, "max_rel": 0.0}
    d = (got - ref).abs()[fin].max().item()
    scale = ref.abs()[fin].max().item()
    return {"max_abs": d, "max_rel": d / scale if scale > 0 else (0.0 if d == 0 else float("inf"))}


def _worst(errs: dict) -> dict:
    return {"max_abs": max(e["max_abs"] for e in errs.values()), "max_rel": max(e["max_rel"] for e in errs.values()),
            "per_output": errs}


def _timed_ms(ctx, fn, iters, warmup) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU, perf_counter on CPU)."""
    return median_ms(fn, iters=iters, warmup=warmup)


def _peak_mib_above(ctx, fn):
    """Peak MiB allocated by one ``fn()`` above what was allocated before (CUDA only)."""
    if not ctx.cuda:
        return None
    ctx.sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    ctx.sync()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return round(peak / MIB, 2)


def _short(e: BaseException, n=600) -> str:
    return f"{type(e).__name__}: {str(e)[:n]}"


@contextlib.contextmanager
def _count_dispatch():
    """Count which kernel implementation the registry picks per op inside the block
    (wraps ``autocp.kernels.registry.select``; restored afterwards)."""
    from autocp.kernels import registry

    counts, orig = {}, registry.select

    def select(op, *a, **kw):
        impl = orig(op, *a, **kw)
        key = f"{op}:{impl.name}"
        counts[key] = counts.get(key, 0) + 1
        return impl

    registry.select = select
    try:
        yield counts
    finally:
        registry.select = orig


def _finite(x) -> bool:
    from torch.utils._pytree import tree_flatten

    return all(bool(torch.isfinite(t.float()).all()) for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor))


# ============================================================================ kernels
def _kernel_impls():
    """(reference module, triton module or None, why Triton is not used or None)."""
    from autocp import kernels as K
    from autocp.kernels import reference as R

    if K.TRITON_IMPORT_ERROR is not None:
        return R, None, f"triton implementations not registered: {K.TRITON_IMPORT_ERROR}"
    T = importlib.import_module("autocp.kernels.triton_impl")
    return R, T, None


def _attn_case(ctx, kind, b, rows, H, D, dtype):
    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(b + D)
    if kind == "tri_attn":  # [B, I, H, Q, D], learned bias [B, 1, H, Q, K] shared by the I rows
        I = min(b, rows)
        shp = (1, I, H, b, D)
        bias = torch.randn(1, 1, H, b, b, device=dev, generator=g).to(dtype)
        kv = torch.rand(1, I, 1, b, device=dev, generator=g) > 0.1
        kv[..., 0] = True
        desc = f"q/k/v[1,{I},{H},{b},{D}] bias[1,1,{H},{b},{b}] key_valid[1,{I},1,{b}]"
    else:  # pair-bias attention [B, H, Q, D], bias [B, H, Q, K], key_valid [K] (padding keys)
        shp = (1, H, b, D)
        bias = torch.randn(1, H, b, b, device=dev, generator=g).to(dtype)
        kv = torch.ones(b, dtype=torch.bool, device=dev)
        kv[-3:] = False
        desc = f"q/k/v[1,{H},{b},{D}] bias[1,{H},{b},{b}] key_valid[{b}]"
    q, k, v = (torch.randn(*shp, device=dev, generator=g).to(dtype) for _ in range(3))
    dout = torch.randn(*shp, device=dev, generator=g)
    return dict(q=q, k=k, v=v, bias=bias, key_valid=kv, scale=D ** -0.5, dout=dout), desc


def _external_tri_attn(x):
    """name -> fwd closure (returns the [B, I, H, Q, D] output) or a string saying why not."""
    q, k, v, bias, kv, sc = x["q"], x["k"], x["v"], x["bias"], x["key_valid"], x["scale"]
    out = {}
    if importlib.util.find_spec("cuequivariance_torch") is None:
        out["cuequivariance_torch"] = "not installed (never pip-installed by this script)"
    else:
        try:
            import cuequivariance_torch as cuet

            mask5 = kv.unsqueeze(-2)  # [B, I, 1, 1, K]

            def cue():
                return cuet.triangle_attention(q, k, v, bias, mask5, sc)

            out["cuequivariance_torch"] = cue
        except Exception as e:  # noqa: BLE001
            out["cuequivariance_torch"] = f"not importable: {_short(e, 200)}"
    if importlib.util.find_spec("trifast") is None:
        out["trifast"] = "not installed (never pip-installed by this script)"
    else:
        try:
            mod = importlib.import_module("trifast")
            tf = getattr(mod, "triangle_attention", None)
            if tf is None:
                tf = importlib.import_module("trifast.torch").triangle_attention
            B, I, H, Q, D = q.shape
            if I != Q:
                raise RuntimeError(f"trifast needs a square tile (I={I} != Q={Q})")
            if abs(sc - D ** -0.5) > 1e-12:
                raise RuntimeError("trifast applies 1/sqrt(D) itself; the case uses another scale")
            tmask = ~kv[:, :, 0, :]  # [B, I, K], True = masked out
            tr = lambda t: t.permute(0, 2, 1, 3, 4)  # noqa: E731  [B, H, I, Q, D]

            def trif():
                return tf(tr(q), tr(k), tr(v), bias[:, 0], tmask).permute(0, 2, 1, 3, 4)

            out["trifast"] = trif
        except Exception as e:  # noqa: BLE001
            out["trifast"] = f"not usable: {_short(e, 200)}"
    return out


def section_kernels(ctx) -> dict:
    from autocp import kernels as K

    R, T, why = _kernel_impls()
    interp = T is not None and bool(getattr(T, "INTERPRET", False))
    use_triton = T is not None and (ctx.cuda or interp)
    if T is not None and not use_triton:
        why = ("CPU run without TRITON_INTERPRET=1 set before start: Triton not run (the torch reference is what "
               "the registry dispatches to on CPU)")
    dtype = ctx.dtype if ctx.cuda else torch.float32
    if ctx.smoke:
        attn = [("tri_attn", 24, 4, 2, 16), ("pb_attn", 24, 0, 2, 8)]
        mm = [(4, 24)]
        iters, warmup = 2, 1
    else:
        # triangle attention 4 heads x 32 (square tiles, so trifast can run too); pair-bias
        # attention of the Pairformer (16 x 24) and of the diffusion transformer (16 x 48) at b = 3750
        attn = [("tri_attn", 256, 256, 4, 32), ("tri_attn", 512, 512, 4, 32),
                ("pb_attn", 1024, 0, 16, 24), ("pb_attn", 3750, 0, 16, 48)]
        mm = [(128, 1024), (8, 3750)]
        iters, warmup = 10, 2
    rows = []
    res = {"dtype": str(dtype).replace("torch.", ""), "triton": "used" if use_triton else why,
           "triton_mode": ("interpreter (correctness only, not timed)" if interp else
                           "compiled" if use_triton else None),
           "iters": iters, "rows": rows,
           "note": ("max_abs / max_rel: vs the torch reference on the same inputs (reference in fp32; max_rel = "
                    "max |diff| / max |ref|); bwd compared with the reference's lse / delta; ms: median; peak_mib: "
                    "max_memory_allocated above the inputs during one call")}
    for kind, b, nrows, H, D in attn:
        if ctx.left() < 0:
            rows.append({"op": kind, "b": b, "skipped": "time budget spent"})
            continue
        x, desc = _attn_case(ctx, kind, b, nrows, H, D, dtype)
        args = (x["q"], x["k"], x["v"], x["bias"], x["key_valid"], x["scale"])
        ref_out, ref_lse = R.tile_attention_fwd(*args)
        delta = (x["dout"] * ref_out).sum(-1)
        ref_g = R.tile_attention_bwd(*args, ref_lse, x["dout"], delta)
        impls = {"torch-reference": R}
        if use_triton:
            impls["triton"] = T
        res.setdefault("registry_dispatches", {})[f"{kind} b={b}"] = {
            "tile_attention_fwd": K.select("tile_attention_fwd", *args).name,
            "tile_attention_bwd": K.select("tile_attention_bwd", *args, ref_lse, x["dout"], delta).name}
        for name, M in impls.items():
            row = {"op": kind, "b": b, "shape": desc, "impl": name}
            rows.append(row)
            try:
                out, lse = M.tile_attention_fwd(*args)
                g = M.tile_attention_bwd(*args, ref_lse, x["dout"], delta)
                row["fwd_err"] = _worst({"out": _err(out, ref_out), "lse": _err(lse, ref_lse)})
                row["bwd_err"] = _worst({n: _err(a, r) for n, a, r in zip(("dq", "dk", "dv", "dbias"), g, ref_g)})
                del out, lse, g
                if name == "triton" and interp:
                    row["note"] = "interpreter: correctness only, not timed"
                    continue
                row["fwd_ms"] = round(_timed_ms(ctx, lambda: M.tile_attention_fwd(*args), iters, warmup), 4)
                row["bwd_ms"] = round(_timed_ms(ctx, lambda: M.tile_attention_bwd(*args, ref_lse, x["dout"], delta),
                                                iters, warmup), 4)
                row["peak_fwd_mib"] = _peak_mib_above(ctx, lambda: M.tile_attention_fwd(*args))
                row["peak_bwd_mib"] = _peak_mib_above(ctx, lambda: M.tile_attention_bwd(*args, ref_lse, x["dout"],
                                                                                          delta))
            except Exception as e:  # noqa: BLE001 -- record, go on (e.g. OOM of one case)
                row["error"] = _short(e)
        if kind == "tri_attn" and ctx.cuda:
            for name, fn in _external_tri_attn(x).items():
                row = {"op": kind, "b": b, "shape": desc, "impl": name}
                rows.append(row)
                if isinstance(fn, str):
                    row["skipped"] = fn
                    continue
                try:
                    with torch.no_grad():
                        row["fwd_err"] = _worst({"out": _err(fn(), ref_out)})
                        row["fwd_ms"] = round(_timed_ms(ctx, fn, iters, warmup), 4)
                        row["peak_fwd_mib"] = _peak_mib_above(ctx, fn)
                except Exception as e:  # noqa: BLE001
                    row["error"] = _short(e)
        del x, args, ref_out, ref_lse, ref_g, delta
        _free(ctx)
    for C, b in mm:
        if ctx.left() < 0:
            rows.append({"op": "tri_mm", "b": b, "skipped": "time budget spent"})
            continue
        g = torch.Generator(device=ctx.device).manual_seed(C + b)
        a = torch.randn(C, b, b, device=ctx.device, generator=g).to(dtype)
        bb = torch.randn(C, b, b, device=ctx.device, generator=g).to(dtype)
        ref = R.tri_mm(a, bb)
        res.setdefault("registry_dispatches", {})[f"tri_mm b={b}"] = {"tri_mm": K.select("tri_mm", a, bb).name}
        impls = {"torch-reference": R}
        if use_triton:
            impls["triton"] = T
        for name, M in impls.items():
            row = {"op": "tri_mm", "b": b, "shape": f"[{C},{b},{b}] x [{C},{b},{b}]^T", "impl": name}
            rows.append(row)
            try:
                row["fwd_err"] = _worst({"out": _err(M.tri_mm(a, bb), ref)})
                if name == "triton" and interp:
                    row["note"] = "interpreter: correctness only, not timed"
                    continue
                row["fwd_ms"] = round(_timed_ms(ctx, lambda: M.tri_mm(a, bb), iters, warmup), 4)
                row["peak_fwd_mib"] = _peak_mib_above(ctx, lambda: M.tri_mm(a, bb))
            except Exception as e:  # noqa: BLE001
                row["error"] = _short(e)
        del a, bb, ref
        _free(ctx)
    for r in rows:  # speed-ups vs the reference of the same case
        ref = next((s for s in rows if s["op"] == r["op"] and s["b"] == r["b"] and s.get("impl") == "torch-reference"
                    and s.get("fwd_ms")), None)
        if ref and r.get("fwd_ms"):
            r["fwd_speedup_vs_ref"] = round(ref["fwd_ms"] / r["fwd_ms"], 2)
        if ref and r.get("bwd_ms") and ref.get("bwd_ms"):
            r["bwd_speedup_vs_ref"] = round(ref["bwd_ms"] / r["bwd_ms"], 2)
    errors = [r for r in rows if "error" in r]
    res["n_errors"] = len(errors)
    return res


# ============================================================================ one rank's tile program
def _free(ctx):
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def _build_tile_program(ctx, model, make_inputs, n, p):
    """The tile program of ``model`` for rank (0, 1) of a simulated p x p mesh at N = n, built
    as :func:`autocp.estimate` builds it, from the public entry points of autocp.passes:

    * the plan at a small N on real CPU tensors (as estimate plans; the plan is by module
      path and does not depend on the device), canonical boundary layouts;
    * ``model`` moved to the device in place, autocp's real 2D op per planned module (or the
      gather fallback), built for ``SquareMesh.simulated(p, (0, 1))``;
    * the graph captured at N and sharded (``build_graph_runner``, ``recompute="ops"``,
      ``pair_dtype``). Differences from estimate, both about the capture only: it runs inside
      the FakeTensorMode with the device as the default device, because the capture of a
      repeated block (``reuse_blocks=True``) makes its example inputs with
      ``passes.trace.example_like`` -- ``torch.randn(shape)``, real and on the CPU otherwise
      (at N = 30000 the diffusion layer's bias input alone is 57.6 GB); if that capture still
      fails, ``reuse_blocks=False`` (every block captured in place: the same ops) is used and
      the first error recorded.

    ``make_inputs(n, factory)`` -> the model's inputs at token length n, tensors from
    ``factory(shape, kind)`` with kind "float" / "mask" / "time". Returns ``(runner, mesh,
    input tags, n_seq, info)``; ``model`` is on the device afterwards."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from autocp.mesh import SquareMesh
    from autocp.passes.graph_emit import build_graph_runner
    from autocp.passes.pipeline import compile_stages, n_seq_of, planning_n, resolve_input_tags
    from autocp.passes.rewrite import GatherFallback
    from autocp.registry import lookup_module

    dev, dt = ctx.device, ctx.dtype

    def real_cpu(shape, kind):
        if kind == "mask":
            return torch.ones(shape, dtype=dt)
        if kind == "time":
            return torch.rand(shape)
        return torch.randn(shape).to(dt)

    model.to("cpu")
    n_small = planning_n(model, p)
    small = make_inputs(n_small, real_cpu)
    tags, _ = resolve_input_tags(model, small, {}, None)
    _, plan = compile_stages(model, small, {}, tags, n_small, SquareMesh.single())
    del small
    model.to(dev)
    sim = SquareMesh.simulated(p, (0, 1) if p > 1 else (0, 0))
    repl, actions = {}, {}
    for path, act in plan.actions.items():
        if not path:
            continue
        mod = model.get_submodule(path)
        actions[path] = f"{act.action}:{act.kind}"
        if act.action == "op":
            repl[path] = (act.builder(mod, sim) if getattr(act, "builder", None) is not None
                          else lookup_module(mod).build(mod, sim))
        else:
            repl[path] = GatherFallback(mod, sim, act, path=path)
    fm = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(shape, kind):
        with fm:
            if kind == "time":
                return torch.empty(shape, device=dev)
            return torch.empty(shape, dtype=dt, device=dev)

    full = make_inputs(n, fake)
    n_seq = n_seq_of([t for t in full if isinstance(t, torch.Tensor)], tags)
    capture_errors = []
    runner = None
    for reuse in (True, False):
        try:
            with warnings.catch_warnings(record=True) as caught, fm, torch.device(dev):
                warnings.simplefilter("always")
                runner = build_graph_runner(model, full, {}, plan, repl, tags, n, n_seq, sim, strict=False,
                                            reuse_blocks=reuse, recompute="ops", pair_dtype=ctx.pair_dtype)
            break
        except Exception as e:  # noqa: BLE001 -- retried without block reuse, then raised
            capture_errors.append(f"reuse_blocks={reuse}: {_short(e, 800)}")
            if not reuse:
                raise
    del full
    gathers = [f"{nt.op} ({nt.detail})" for nt in runner.notes if nt.what in ("gather", "op-gather") and nt.pair]
    info = {"plan": actions, "input_tags": [list(t) if t else None for t in tags],
            "capture_reuse_blocks": reuse, "capture_errors": capture_errors,
            "pair_gathers": gathers, "opaque_fallbacks": list(getattr(runner, "opaque_fallbacks", [])),
            "storage_rewrites": dict(runner.storage),
            "warnings": [str(w.message)[:300] for w in caught][:8]}
    return runner, sim, tags, n_seq, info


def _local_inputs(ctx, make_inputs, tags, n, p):
    """This rank's REAL input tiles (token axes -> b = ceil(N/p)) on the device."""
    b = -(-n // p)
    dev, dt = ctx.device, ctx.dtype
    g = torch.Generator(device=dev).manual_seed(1234)
    shapes = make_inputs(n, lambda shape, kind: (tuple(shape), kind))
    out = []
    for (shape, kind), tg in zip(shapes, tags):
        shape = [b if (tg and tg[d] in ("r", "c")) else s for d, s in enumerate(shape)]
        if kind == "mask":
            out.append(torch.ones(shape, dtype=dt, device=dev))
        elif kind == "time":
            out.append(torch.rand(shape, device=dev, generator=g))
        else:
            out.append(torch.randn(shape, device=dev, generator=g, dtype=dt))
    return out


def _one_run(ctx, call, rec, res, params, loc):
    """One call of the tile program: wall time (synchronised), peak memory (CUDA:
    ``max_memory_allocated`` reset before the call; CPU: the live-bytes tracker with the
    parameters and input tiles counted), the bytes the simulated communication would send."""
    from autocp import comm
    from autocp.memory import MemoryTracker

    if ctx.cuda:
        ctx.sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with comm.count_comm() as st:
            t = time.perf_counter()
            out = call()
            torch.cuda.synchronize()
            rec["wall_s"] = round(time.perf_counter() - t, 4)
        rec["max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
        rec["allocated_before"] = int(base)
        rec["peak_above_inputs_and_params"] = int(torch.cuda.max_memory_allocated() - base)
        rec["max_memory_reserved"] = int(torch.cuda.max_memory_reserved())
    else:
        with MemoryTracker(track=[*params, *loc]) as mt, comm.count_comm() as st:
            t = time.perf_counter()
            out = call()
            rec["wall_s"] = round(time.perf_counter() - t, 4)
        rec["max_memory_allocated"] = int(mt.peak_bytes)  # CPU: live-bytes tracker (params + inputs + all)
        rec["peak_above_inputs_and_params"] = int(mt.peak_bytes - res["params_bytes"] - res["input_bytes"])
        rec["memory_measure"] = "autocp.memory.MemoryTracker (CPU live tensor bytes)"
    rec["comm_bytes_sent_simulated"] = int(st.total_bytes)
    if rec["first_call"]:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.utils._pytree import tree_flatten

        if any(isinstance(o, FakeTensor) for o in tree_flatten(out)[0]):
            raise RuntimeError("the tile program returned FakeTensors (a fake constant from the capture reached the "
                               "run): the measurement would not be real")
        res["comm_calls"] = dict(st.calls)
        res["outputs"] = [list(o.shape) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        res["outputs_finite"] = _finite(out)
        res["outputs_note"] = ("values are not meaningful: simulated receive buffers are uninitialised memory "
                               "(torch.empty), so non-finite outputs are expected")
    del out


def _run_tile_program(ctx, model, make_inputs, label) -> dict:
    """Build, then run one rank's tile program on real tiles: first call (compiles Triton
    kernels), then timed calls with ``max_memory_allocated`` reset before each."""
    from autocp import comm
    from autocp.ops.common import DEFAULT_CHUNK_FRACTION, DEFAULT_MIN_CHUNK_BYTES, chunk_fraction
    from autocp.passes.context import tile_context

    n, p = ctx.n, ctx.p
    res = {"what": label, "n_tokens": n, "mesh": [p, p], "rank": [0, 1] if p > 1 else [0, 0],
           "tile_tokens_b": -(-n // p), "device": str(ctx.device), "dtype": str(ctx.dtype).replace("torch.", ""),
           "autocast": ctx.low, "pair_dtype": str(ctx.pair_dtype).replace("torch.", "") if ctx.pair_dtype else None,
           "chunking": {"fraction": chunk_fraction(), "default_fraction": DEFAULT_CHUNK_FRACTION,
                        "default_min_chunk_bytes": DEFAULT_MIN_CHUNK_BYTES},
           "comm": "simulated (autocp.comm.simulate): real receive / gather buffers, no data moved, no comm time"}
    model = model.eval()
    res["params_bytes"] = int(sum(q.numel() * q.element_size() for q in model.parameters()))
    t = time.time()
    runner, sim, tags, n_seq, info = _build_tile_program(ctx, model, make_inputs, n, p)
    params = list(model.parameters())
    res["build_s"] = round(time.time() - t, 2)
    res.update(info)
    loc = _local_inputs(ctx, make_inputs, tags, n, p)
    res["input_tiles"] = [list(x.shape) for x in loc]
    res["input_bytes"] = int(sum(x.numel() * x.element_size() for x in loc))

    def call():
        with torch.no_grad(), comm.simulate(sim), tile_context(sim, n, n_seq), ctx.autocast():
            return runner(loc, {})

    runs = []
    res["runs"] = runs
    first = True
    for i in range(1 + max(0, ctx.repeats)):
        if not first and ctx.left() < (runs[-1]["wall_s"] * 1.5 if runs else 0):
            res["repeats_skipped"] = f"time budget: {1 + ctx.repeats - i} run(s) not started"
            break
        _free(ctx)
        rec = {"first_call": first}
        counter = _count_dispatch() if first else contextlib.nullcontext({})
        with counter as dispatched:
            _one_run(ctx, call, rec, res, params, loc)
        if first:
            res["kernel_dispatch"] = dict(dispatched)
        runs.append(rec)
        first = False
    timed = [r for r in runs if not r["first_call"]] or runs
    res["time_per_call_s"] = round(statistics.median(r["wall_s"] for r in timed), 4)
    res["first_call_s"] = runs[0]["wall_s"]
    res["peak_bytes"] = max(r["max_memory_allocated"] for r in timed)
    res["peak_gib"] = round(res["peak_bytes"] / GIB, 3)
    res["timed_from"] = "runs after the first" if len(runs) > 1 else "the first run only (includes Triton JIT)"
    del runner, loc
    return res


# ---------------------------------------------------------------------------- Pairformer block
def _pairformer_model(ctx):
    from pairformer_setup import build_pairformer

    return build_pairformer(ctx.pf_cfg, seed=0).eval()


def _pairformer_inputs(cfg):
    cs, cz = cfg["token_s"], cfg["token_z"]

    def make(n, f):
        return (f((1, n, cs), "float"), f((1, n, n, cz), "float"), f((1, n), "mask"), f((1, n, n), "mask"))

    return make


def section_pairformer(ctx) -> dict:
    model = _pairformer_model(ctx)
    res = _run_tile_program(ctx, model, _pairformer_inputs(ctx.pf_cfg),
                            "one Boltz-2 PairformerLayer (PairformerModule num_blocks=1, v2) forward, no grad")
    res["config"] = ctx.pf_cfg
    b = res["tile_tokens_b"]
    res["z_tile_bytes"] = b * b * ctx.pf_cfg["token_z"] * torch.empty((), dtype=ctx.dtype).element_size()
    res["peak_in_z_tiles"] = round(res["peak_bytes"] / res["z_tile_bytes"], 2)
    return res


# ---------------------------------------------------------------------------- diffusion step
class DiffusionTokenStep(nn.Module):
    """The token part of ``boltz.model.modules.diffusionv2.DiffusionModule.forward`` (Boltz's
    own submodules, called exactly as there, multiplicity 1): the atom attention encoder's
    token output ``a`` comes in as an input, the decoder is not run."""

    def __init__(self, dm):
        super().__init__()
        self.single_conditioner = dm.single_conditioner
        self.s_to_a_linear = dm.s_to_a_linear
        self.token_transformer = dm.token_transformer
        self.a_norm = dm.a_norm

    def forward(self, s_inputs, s_trunk, a, token_trans_bias, mask, times):
        s, _ = self.single_conditioner(times, s_trunk, s_inputs)
        a = a + self.s_to_a_linear(s)
        a = self.token_transformer(a, mask=mask.float(), s=s, bias=token_trans_bias.float(), multiplicity=1)
        return self.a_norm(a)


class DiffusionTokenStepLazyBias(DiffusionTokenStep):
    """As :class:`DiffusionTokenStep`, but from the conditioned ``z`` tile: layer ``l`` reads
    ``token_trans_proj_z[l](z)`` (Boltz-2 ``DiffusionConditioning``'s LayerNorm + Linear) when
    it runs -- the per-layer bias of autocp's lazy token bias (autocp.models.boltz_bias)."""

    def __init__(self, dm, cond):
        super().__init__(dm)
        self.token_trans_proj_z = cond.token_trans_proj_z

    def forward(self, s_inputs, s_trunk, a, z, mask, times):
        s, _ = self.single_conditioner(times, s_trunk, s_inputs)
        a = a + self.s_to_a_linear(s)
        m = mask.float()
        for layer, proj in zip(self.token_transformer.layers, self.token_trans_proj_z):
            a = layer(a, s, proj(z).float(), m, None, 1)
        return self.a_norm(a)


def _diffusion_modules(cfg, seed=0):
    from boltz.model.modules.diffusion_conditioning import DiffusionConditioning
    from boltz.model.modules.diffusionv2 import DiffusionModule

    torch.manual_seed(seed)
    dm = DiffusionModule(token_s=cfg["token_s"], atom_s=cfg["atom_s"], atoms_per_window_queries=32,
                         atoms_per_window_keys=128, sigma_data=cfg["sigma_data"], dim_fourier=cfg["dim_fourier"],
                         atom_encoder_depth=cfg["atom_encoder_depth"], atom_encoder_heads=cfg["atom_encoder_heads"],
                         token_transformer_depth=cfg["token_transformer_depth"],
                         token_transformer_heads=cfg["token_transformer_heads"],
                         atom_decoder_depth=cfg["atom_decoder_depth"], atom_decoder_heads=cfg["atom_decoder_heads"],
                         conditioning_transition_layers=cfg["conditioning_transition_layers"])
    cond = DiffusionConditioning(token_s=cfg["token_s"], token_z=cfg["token_z"], atom_s=cfg["atom_s"],
                                 atom_z=cfg["atom_z"], atom_encoder_depth=cfg["atom_encoder_depth"],
                                 atom_encoder_heads=cfg["atom_encoder_heads"],
                                 token_transformer_depth=cfg["token_transformer_depth"],
                                 token_transformer_heads=cfg["token_transformer_heads"],
                                 atom_decoder_depth=cfg["atom_decoder_depth"],
                                 atom_decoder_heads=cfg["atom_decoder_heads"], atom_feature_dim=388,
                                 conditioning_transition_layers=cfg["conditioning_transition_layers"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # Boltz zero-inits output projections: re-draw everything (as the benchmarks do)
        for m in (dm, cond):
            for prm in m.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.05 + (1.0 if prm.dim() == 1 else 0.0))
    return dm, cond


def _diffusion_inputs(cfg, lazy: bool):
    ts, L, H = cfg["token_s"], cfg["token_transformer_depth"], cfg["token_transformer_heads"]
    pair_c = cfg["token_z"] if lazy else L * H

    def make(n, f):
        return (f((1, n, ts), "float"), f((1, n, ts), "float"), f((1, n, 2 * ts), "float"),
                f((1, n, n, pair_c), "float"), f((1, n), "mask"), f((1,), "time"))

    return make


def _diffusion_section(ctx, lazy: bool) -> dict:
    cfg = ctx.df_cfg
    dm, cond = _diffusion_modules(cfg)
    model = DiffusionTokenStepLazyBias(dm, cond) if lazy else DiffusionTokenStep(dm)
    del dm, cond
    what = ("one Boltz-2 score-model step, token part (single_conditioner, s_to_a_linear, token_transformer "
            f"{cfg['token_transformer_depth']} x {cfg['token_transformer_heads']} heads at width "
            f"{2 * cfg['token_s']}, a_norm), forward, no grad; " +
            ("bias per layer from the held z tile (lazy)" if lazy else
             "token_trans_bias [B, N, N, depth*heads] resident as a Pair2D input tile"))
    res = _run_tile_program(ctx, model, _diffusion_inputs(cfg, lazy), what)
    res["config"] = cfg
    res["not_measured"] = {"atom_attention_encoder_decoder_and_conditioning": ATOM_PARTS_NOT_MEASURED}
    return res


def section_diffusion(ctx) -> dict:
    return _diffusion_section(ctx, lazy=False)


def section_diffusion_lazy(ctx) -> dict:
    return _diffusion_section(ctx, lazy=True)


# ---------------------------------------------------------------------------- estimate
def section_estimate(ctx) -> dict:
    """autocp.estimate (FakeTensors on CPU) of the same configurations, to set beside the
    measured peaks (same dtype semantics: fp32 weights, autocast, pair_dtype)."""
    import autocp

    out = {"note": "autocp.estimate: FakeTensor run on CPU, parameters included; compare with peak_bytes above"}
    kw = dict(n_tokens=ctx.n, mesh_shape=(ctx.p, ctx.p), dtype=ctx.dtype, pair_dtype=ctx.pair_dtype)

    def meta_inputs(make):
        def mk(n):
            return make(n, lambda shape, kind: torch.empty(shape, dtype=torch.float32 if kind == "time" else ctx.dtype,
                                                           device="meta"))
        return mk

    jobs = [("pairformer_block", lambda: _pairformer_model(ctx), _pairformer_inputs(ctx.pf_cfg))]
    dm_cfg = ctx.df_cfg
    jobs.append(("diffusion_step", lambda: DiffusionTokenStep(_diffusion_modules(dm_cfg)[0]),
                 _diffusion_inputs(dm_cfg, False)))
    heads = dm_cfg["token_transformer_heads"]
    layer_bias_bytes = ctx.n * ctx.n * heads * 4
    for name, build, make in jobs:
        if ctx.left() < 0:
            out[name] = {"skipped": "time budget spent"}
            continue
        if name == "diffusion_step" and layer_bias_bytes > GIB:
            out[name] = {"skipped": (
                f"autocp.estimate captures the repeated DiffusionTransformerLayer outside its FakeTensorMode: "
                f"passes/trace.py capture() -> example_like() makes a REAL torch.randn example input per block at "
                f"N, here the layer's bias [1, {ctx.n}, {ctx.n}, {heads}] fp32 = {layer_bias_bytes / 1e9:.1f} GB "
                f"of host memory (seen on CPU: 'DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                f"57600000000 bytes' at N=30000); not attempted")}
            continue
        t = time.time()
        try:
            e = autocp.estimate(build(), make_inputs=meta_inputs(make), **kw)
            out[name] = {"peak_bytes": int(e.peak_bytes), "peak_gib": round(e.peak_bytes / GIB, 3),
                         "params_bytes": int(e.params_bytes), "wall_s": round(time.time() - t, 2),
                         "per_module_peak_bytes": {k: int(v["peak_bytes"]) for k, v in e.per_module.items()}}
        except Exception as ex:  # noqa: BLE001
            out[name] = {"error": _short(ex), "wall_s": round(time.time() - t, 2)}
    return out


#: run order: the headline measurements first (a GPU run is precious)
SECTIONS = [
    ("pairformer_block", section_pairformer),
    ("diffusion_step", section_diffusion),
    ("kernels", section_kernels),
    ("diffusion_step_lazy_bias", section_diffusion_lazy),
    ("estimate", section_estimate),
]
#: seconds of budget a section needs left to start on a GPU run (estimate: ~40 s of CPU at N=30000)
MIN_LEFT_S = {"estimate": 60.0, "diffusion_step_lazy_bias": 20.0}


# ============================================================================ driver
def _meta(ctx) -> dict:
    m = {"mode": "cpu-smoke" if ctx.smoke else ("gpu" if ctx.cuda else "cpu"), "python": platform.python_version(),
         "torch": torch.__version__, "cuda": torch.version.cuda, "args": vars(ctx.args),
         "host": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if ctx.cuda:
        prop = torch.cuda.get_device_properties(0)
        m.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                 device_total_bytes=int(prop.total_memory),
                 tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
    else:
        m["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        import triton

        m["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        m["triton"] = f"not importable: {_short(e, 200)}"
    m["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    m["AUTOCP_KERNELS"] = os.environ.get("AUTOCP_KERNELS")
    for mod in ("cuequivariance_torch", "trifast", "boltz"):
        try:
            from importlib.metadata import version

            m[f"{mod}_version"] = version(mod.replace("_", "-")) if importlib.util.find_spec(mod) else None
        except Exception:  # noqa: BLE001
            m[f"{mod}_version"] = "installed (version unknown)" if importlib.util.find_spec(mod) else None
    try:
        m["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                         timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        m["git_commit"] = None
    try:
        from autocp import kernels as K

        m["kernel_registry"] = {op: [i.name for i in K.implementations(op)]
                                for op in ("tile_attention_fwd", "tile_attention_bwd", "tri_mm")}
        m["triton_import_error"] = K.TRITON_IMPORT_ERROR
    except Exception as e:  # noqa: BLE001
        m["kernel_registry"] = f"error: {_short(e)}"
    return m


def _write(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


def _fmt_bytes(x):
    return "-" if x is None else f"{x / GIB:.3f} GiB" if x >= GIB else f"{x / MIB:.1f} MiB"


def summary(data) -> str:
    m = data["meta"]
    lines = [f"gpu_check [{m['mode']}] device: {m.get('device')}  torch {m['torch']}  triton {m.get('triton')}",
             f"  N={m['args']['tokens']} on a simulated {m['args']['mesh']}x{m['args']['mesh']} mesh, "
             f"dtype {m['args']['dtype']}; wall {data.get('wall_s')} s"]
    for name, sec in data["sections"].items():
        st = sec.get("status")
        head = f"[{name}] {st}"
        if st == "error":
            lines.append(f"{head}: {sec.get('error')}")
            continue
        if st == "skipped":
            lines.append(f"{head}: {sec.get('skipped')}")
            continue
        lines.append(f"{head} ({sec.get('section_wall_s')} s)")
        if name == "kernels":
            lines.append(f"  triton: {sec.get('triton')}  ({sec.get('triton_mode')})")
            lines.append(f"  {'op':9} {'b':>5} {'impl':22} {'fwd ms':>9} {'bwd ms':>9} {'x ref f/b':>11} "
                         f"{'fwd err abs/rel':>19} {'bwd err abs/rel':>19}  note")
            for r in sec.get("rows", []):
                fe, be = r.get("fwd_err"), r.get("bwd_err")
                f = lambda e: f"{e['max_abs']:.1e}/{e['max_rel']:.1e}" if e else "-"  # noqa: E731
                sp = f"{r.get('fwd_speedup_vs_ref', '-')}/{r.get('bwd_speedup_vs_ref', '-')}"
                note = r.get("error") or r.get("skipped") or r.get("note") or ""
                lines.append(f"  {r['op']:9} {r['b']:>5} {str(r.get('impl', '-'))[:22]:22} "
                             f"{r.get('fwd_ms', '-')!s:>9} {r.get('bwd_ms', '-')!s:>9} {sp:>11} {f(fe):>19} "
                             f"{f(be):>19}  {note[:90]}")
        elif name == "estimate":
            for k, v in sec.items():
                if isinstance(v, dict):
                    lines.append(f"  {k}: " + (f"estimate {_fmt_bytes(v['peak_bytes'])} ({v['wall_s']} s)"
                                               if "peak_bytes" in v else str(v.get("error") or v.get("skipped"))))
        else:
            lines.append(f"  {sec.get('what')}")
            lines.append(f"  rank {sec.get('rank')} of {sec.get('mesh')}, b={sec.get('tile_tokens_b')}: peak "
                         f"{_fmt_bytes(sec.get('peak_bytes'))} (params {_fmt_bytes(sec.get('params_bytes'))}, input "
                         f"tiles {_fmt_bytes(sec.get('input_bytes'))}); time/call {sec.get('time_per_call_s')} s "
                         f"(first call {sec.get('first_call_s')} s, build {sec.get('build_s')} s); pair gathers: "
                         f"{len(sec.get('pair_gathers') or [])}")
            lines.append(f"  kernels dispatched (first call): {sec.get('kernel_dispatch')}; capture reuse_blocks="
                         f"{sec.get('capture_reuse_blocks')}; outputs finite: {sec.get('outputs_finite')} "
                         f"(not meaningful under simulated comm)")
            if sec.get("not_measured"):
                lines.append("  not measured: atom attention encoder / decoder (see JSON not_measured)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (N=24, p=2, tiny widths)")
    ap.add_argument("--tokens", type=int, default=None, help="N (default 30000; 24 with --cpu-smoke)")
    ap.add_argument("--mesh", type=int, default=None, help="mesh side p (default 8; 2 with --cpu-smoke)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu_check.json"))
    ap.add_argument("--time-budget", type=float, default=420.0,
                    help="seconds; no new section / timed repeat starts after it (default 420)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls after the first, per tile program")
    ap.add_argument("--sections", nargs="+", default=[s for s, _ in SECTIONS], choices=[s for s, _ in SECTIONS])
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = 24 if args.cpu_smoke else 30000
    if args.mesh is None:
        args.mesh = 2 if args.cpu_smoke else 8
    if args.cpu_smoke:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "1")))))
    ctx = Ctx(args)
    data = {"meta": _meta(ctx), "sections": {}, "skipped_for_time": []}
    if not ctx.smoke and not ctx.cuda:
        data["error"] = "no CUDA device: run with --cpu-smoke on CPU"
        _write(args.out, data)
        print(data["error"])
        return 2
    if args.tokens < args.mesh:
        ap.error(f"--tokens {args.tokens} < --mesh {args.mesh}")
    for name, fn in SECTIONS:
        if name not in args.sections:
            data["sections"][name] = {"status": "skipped", "skipped": "not selected (--sections)"}
            continue
        need = 0.0 if ctx.smoke else MIN_LEFT_S.get(name, 0.0)
        if ctx.left() < need:
            data["sections"][name] = {"status": "skipped", "skipped": (
                f"time budget {args.time_budget:.0f} s: {max(ctx.left(), 0):.0f} s left at {ctx.elapsed():.0f} s, "
                f"this section needs {need:.0f} s" if need else
                f"time budget {args.time_budget:.0f} s spent before it started ({ctx.elapsed():.0f} s)")}
            data["skipped_for_time"].append(name)
            _write(args.out, data)
            continue
        print(f"[{ctx.elapsed():6.1f} s] {name} ...", flush=True)
        t = time.time()
        try:
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            sec = fn(ctx)
            sec = {"status": "ok", **sec}
        except Exception as e:  # noqa: BLE001 -- one failing section must not lose the others
            sec = {"status": "error", "error": _short(e, 2000),
                   "traceback": traceback.format_exc().splitlines()[-30:]}
        sec["section_wall_s"] = round(time.time() - t, 2)
        if ctx.cuda:
            sec["section_max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
        data["sections"][name] = sec
        _free(ctx)
        data["wall_s"] = round(ctx.elapsed(), 1)
        _write(args.out, data)
    data["wall_s"] = round(ctx.elapsed(), 1)
    _write(args.out, data)
    print(summary(data))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
