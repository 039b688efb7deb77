"""Rank functions of the corpus tests and report (module-level: picklable).

``parity_worker(rank, world, case)``: the single-device forward + backward of a corpus
case against ``autocp.parallelize`` on the ``p x p`` mesh of ``world`` ranks. Every phase
that raises re-raises as ``CorpusFailure("[phase] Type: message")`` so that the failure
names where it happened (``run_distributed`` reports it per rank).
"""

import importlib
import re
import time
import warnings

import torch

HARNESSES = ("alphafold3_pytorch", "protenix", "openfold3", "tfold", "msa_pairformer")
def _variants(name: str) -> tuple:
    """A harness's extra call variants (``VARIANTS``, each built by ``build_<variant>``)."""
    return tuple(getattr(importlib.import_module(f"tests.corpus.{name}"), "VARIANTS", ()))


CASES = tuple(f"{h}{v}" for h in HARNESSES for v in ("", ":wrapped")) + tuple(
    f"{h}:{v}" for h in HARNESSES for v in _variants(h))
TOL = 1e-4


class CorpusFailure(RuntimeError):
    pass


def harness(name: str):
    return importlib.import_module(f"tests.corpus.{name}")


def build_case(case: str, seed: int = 0, n: int = 7):
    name, _, variant = case.partition(":")
    h = harness(name)
    return (getattr(h, f"build_{variant}") if variant else h.build)(seed, n)


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    return []


def _tensors(args, kwargs):
    return [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]


def _weights(outs, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g) for o in outs]


def _loss(outs, w):
    return sum((o.float() * wi).sum() for o, wi in zip(outs, w))


class _Phase:
    def __init__(self, res):
        self.res = res

    def __call__(self, name):
        self.res["phase"] = name
        return self

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if e is not None and not isinstance(e, CorpusFailure):
            raise CorpusFailure(f"[{self.res['phase']}] {type(e).__name__}: {str(e).strip()}") from e
        return False


def _gathered_from_explain(text: str):
    m = re.search(r"(\d+)\s+gathered", text)
    if m:
        return int(m.group(1))
    return sum(1 for line in text.splitlines() if "gathered" in line.lower() or "fallback" in line.lower())


def parity_worker(rank, world, case, seed=0, n=7):
    """Outputs and all parameter gradients of ``parallelize(model)`` vs the model itself."""
    import autocp
    from autocp.ops.common import sync_grads

    res = {"case": case, "world": world, "phase": "build"}
    phase = _Phase(res)
    with phase("build"):
        model, (args, kwargs), desc = build_case(case, seed, n)
        res["desc"] = desc
        outs_ref = _flat(model(*args, **kwargs))
        if not outs_ref:
            raise CorpusFailure(f"[build] the model returned no tensor: {type(outs_ref)}")
    with phase("reference (single device)"):
        model.zero_grad()
        outs_ref = _flat(model(*args, **kwargs))
        w = _weights(outs_ref)
        _loss(outs_ref, w).backward()
        ref_grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        # non-vacuous: the output depends on the input, and the gradients are not zero
        ins = _tensors(args, kwargs)
        floats = [x for x in ins if x.is_floating_point()]
        with torch.no_grad():
            p_args = tuple(x + 0.5 if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 3 else x
                           for x in args)
            p_kwargs = {k: (x + 0.5 if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 3 else x)
                        for k, x in kwargs.items()}
            outs_p = _flat(model(*p_args, **p_kwargs))
        res["input_sensitivity"] = max(float((a - b.detach()).abs().max()) for a, b in zip(outs_p, outs_ref))
        # ... and the stack is not an identity: each output of an input's shape moved away from it
        moved = [float((o.detach() - x).abs().max()) for o in outs_ref
                 for x in [next((x for x in floats if x.shape == o.shape), None)] if x is not None]
        res["moved"] = min(moved) if moved else None
        res["n_params"] = len(list(model.parameters()))
        res["n_zero_grad_params"] = sum(1 for k, p in model.named_parameters()
                                        if k not in ref_grads or float(ref_grads[k].abs().max()) == 0.0)
        res["max_ref_grad"] = max(float(g.abs().max()) for g in ref_grads.values()) if ref_grads else 0.0
        res["n_inputs"] = len(floats)
        model.zero_grad()
    mesh = autocp.init_mesh()
    with phase("parallelize"), warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        t0 = time.time()
        pm = autocp.parallelize(model, mesh, example_inputs=(args, kwargs), strict=True)
        res["compile_s"] = time.time() - t0
    with phase("explain"):
        try:
            text = pm.explain()
            res["explain_gathered"] = _gathered_from_explain(text)
            res["explain_summary"] = [line for line in text.splitlines() if "gathered" in line][:3]
        except Exception as e:  # noqa: BLE001  (explain is informative only)
            res["explain_gathered"] = None
            res["explain_summary"] = [f"explain() failed: {type(e).__name__}: {e}"[:200]]
    with phase("parallel forward"), warnings.catch_warnings(record=True) as wl2:
        warnings.simplefilter("always")
        outs = _flat(pm(*args, **kwargs))
    msgs = [str(x.message) for x in (*wl, *wl2)]
    res["warnings"] = sorted({m[:300] for m in msgs})
    res["n_gathered_warnings"] = sum(1 for m in msgs if "gathered" in m)
    # "autocp: K glue op(s) gather a pair tensor ..." (one warning for K ops)
    res["gathered_glue_ops"] = sum(int(g) for m in msgs for g in re.findall(r"(\d+) glue op\(s\) gather", m))
    with phase("compare outputs"):
        if len(outs) != len(outs_ref):
            raise CorpusFailure(f"[compare outputs] {len(outs)} outputs, the model returns {len(outs_ref)}")
        res["out_rel_err"] = []
        for a, b in zip(outs, outs_ref):
            if tuple(a.shape) != tuple(b.shape):
                raise CorpusFailure(f"[compare outputs] output shape {tuple(a.shape)}, the model's {tuple(b.shape)}")
            res["out_rel_err"].append(float((a.detach() - b.detach()).abs().max())
                                      / max(float(b.detach().abs().max()), 1e-30))
    with phase("parallel backward"):
        _loss(outs, w).backward()
        auto = getattr(pm, "auto_grad_sync", None)
        if auto is None:
            auto = getattr(pm, "grad_reducer", None) is not None
        res["auto_grad_sync"] = bool(auto)
        # a self-reducing module has complete gradients after backward; sync_grads is then a
        # documented no-op (it would only reduce a pending no_sync backward)
        if not auto:
            sync_grads(pm, mesh)
    with phase("compare grads"):
        _compare_grads(res, pm, ref_grads)
    res["phase"] = "done"
    return res


def _compare_grads(res, pm, ref_grads):
    """Every parameter gradient of ``pm`` vs the reference, relative to its scale (floored at
    1e-2 of the largest reference gradient) -> ``res``."""
    floor = 1e-2 * max(float(g.abs().max()) for g in ref_grads.values())
    per = {}
    missing_grads = []
    for k, p in pm.named_parameters():
        if k not in ref_grads:
            continue
        if p.grad is None:
            missing_grads.append(k)
            continue
        per[k] = float((p.grad - ref_grads[k]).abs().max()) / max(float(ref_grads[k].abs().max()), floor, 1e-30)
    res["missing_grads"] = missing_grads
    res["grad_rel_err"] = max(per.values()) if per else float("inf")
    res["worst_grads"] = sorted(per.items(), key=lambda kv: -kv[1])[:3]
    res["n_compared_grads"] = len(per)


def tile_parity_worker(rank, world, case, seed=0, n=7):
    """Tiles in, tiles out on the corpus (issue [tile-io]): this rank's tiles as DTensors in
    the layouts parallelize chose, ``output="dtensor"``, the corpus loss written with DTensor
    ops (``(o * w).sum().full_tensor()``), ``loss.backward()``: outputs and every parameter
    gradient vs the single device, and the input gradients of the DTensor inputs."""
    import autocp
    from torch.distributed.tensor import DTensor, Replicate

    res = {"case": case, "world": world, "phase": "build"}
    phase = _Phase(res)
    with phase("build"):
        model, (args, kwargs), _ = build_case(case, seed, n)
    with phase("reference (single device)"):
        outs_ref = _flat(model(*args, **kwargs))
        w = _weights(outs_ref)
        _loss(outs_ref, w).backward()
        ref_grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    mesh = autocp.init_mesh()
    with phase("parallelize"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=(args, kwargs), strict=True)
    with phase("tile forward"):
        a, kw, _ = _local_inputs(pm, args, kwargs)
        outs = _flat(pm(*a, output="dtensor", **kw))
        res["n_dtensor_outputs"] = sum(isinstance(o, DTensor) for o in outs)
        res["out_rel_err"] = [float((o.full_tensor() if isinstance(o, DTensor) else o).detach().sub(r.detach())
                                    .abs().max()) / max(float(r.detach().abs().max()), 1e-30)
                              for o, r in zip(outs, outs_ref)]
    with phase("tile backward"):
        loss = 0.0
        for o, wi in zip(outs, w):
            if isinstance(o, DTensor):
                wd = DTensor.from_local(wi, o.device_mesh, [Replicate()] * o.device_mesh.ndim, run_check=False)
                loss = loss + (o.float() * wd.redistribute(o.device_mesh, o.placements)).sum().full_tensor()
            else:
                loss = loss + (o.float() * wi).sum()
        loss.backward()
    with phase("compare grads"):
        _compare_grads(res, pm, ref_grads)
    res["phase"] = "done"
    return res


def _local_inputs(pm, args, kwargs):
    """This rank's tiles of ``(args, kwargs)`` as DTensors in the layouts parallelize chose
    (``pm.to_tiles``), and the local tensors they hold (for the memory tracker)."""
    from torch.distributed.tensor import DTensor

    a, kw = pm.to_tiles(*args, **kwargs)
    tiles = [x.to_local() if isinstance(x, DTensor) else x for x in _tensors(a, kw)]
    return a, kw, tiles


def memory_worker(rank, world, case, n=96, seed=0):
    """Per-rank peak (parameters + this rank's input tiles + live tensors) of a no-grad
    forward of the parallelized model at ``n`` tokens on local tiles (``output="local"``);
    rank 0 also measures the single device (parameters + full inputs + live tensors)."""
    import autocp

    res = {"case": case, "n": n}
    phase = _Phase(res)
    with phase("build"):
        model, (args, kwargs), _ = build_case(case, seed, n)
    if rank == 0:
        with phase("single-device memory"), torch.no_grad(), \
                autocp.MemoryTracker(track=[*model.parameters(), *_tensors(args, kwargs)]) as mt:
            model(*args, **kwargs)
        res["peak_single"] = mt.peak_bytes
    mesh = autocp.init_mesh()
    with phase("parallelize"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=(args, kwargs))
    with phase("parallel memory"), torch.no_grad():
        a, kw, tiles = _local_inputs(pm, args, kwargs)
        with autocp.MemoryTracker(track=[*model.parameters(), *tiles]) as mt:
            pm(*a, output="local", **kw)
        res["peak_rank"] = mt.peak_bytes
    return res
