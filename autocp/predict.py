"""``autocp predict``: fold a complex from Boltz's own inputs on a ``p x p`` mesh.

The same steps as ``boltz predict`` (``boltz.main.predict``), reusing Boltz's code for each
of them -- input checking and processing (``check_inputs`` / ``process_inputs``: YAML /
FASTA parsing, MSA files, ligand conformers), the manifest filters, the inference data
modules (featurizer), ``load_from_checkpoint`` with the overrides ``boltz predict`` passes,
``predict_step`` and the writers (``BoltzWriter`` / ``BoltzAffinityWriter``) -- with one
difference: the model runs through :func:`autocp.parallelize` on the mesh, so every pair
tensor lives as a tile ``z[T_r, T_c]`` (O(N^2/P) per rank).

No O(N^2 * C) tensor is gathered: ``predict_step``'s ``s`` / ``z`` stay tiles and are
dropped; only what the writer reads (coordinates, pLDDT, the N x N PAE / PDE maps,
pTM / ipTM, affinity) is assembled, on rank 0 only (:func:`gather_to_rank0`), and rank 0
writes Boltz's output tree (``predictions/<name>/<name>_model_0.cif``,
``confidence_<name>_model_0.json``, ``pae_`` / ``pde_`` / ``plddt_<name>_model_0.npz``,
``affinity_<name>.json``).

Launch: under ``torchrun --nproc-per-node P`` (the mesh from the world size; NCCL on GPUs,
gloo on CPU), or on one machine's CPUs with ``--mesh p`` (``p * p`` local processes, as
``autocp demo``). Numbers: fp32 (``boltz predict`` runs Boltz-2 in bf16-mixed; at fp32 and
the same seed, the written files equal Boltz's own fp32 run, see docs/predict.md).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = ["TRAINING_TARGETS", "PredictConfig", "prepare_inputs", "predict_rank", "gather_to_rank0", "run_predict"]


@dataclass
class PredictConfig:
    """The flags of ``boltz predict`` that ``autocp predict`` takes (same names and defaults),
    plus the mesh. ``out_dir`` receives ``boltz_results_<input stem>/`` as Boltz writes it."""

    data: str
    out_dir: str = "./"
    cache: str = "~/.boltz"
    checkpoint: Optional[str] = None
    affinity_checkpoint: Optional[str] = None
    model: str = "boltz2"
    recycling_steps: int = 3
    sampling_steps: int = 200
    diffusion_samples: int = 1
    sampling_steps_affinity: int = 200
    diffusion_samples_affinity: int = 3
    max_parallel_samples: Optional[int] = None
    step_scale: Optional[float] = None
    write_full_pae: bool = False
    write_full_pde: bool = False
    output_format: str = "mmcif"
    num_workers: int = 0
    override: bool = False
    seed: Optional[int] = None
    use_potentials: bool = False
    method: Optional[str] = None
    affinity_mw_correction: bool = False
    preprocessing_threads: int = 1
    max_msa_seqs: int = 8192
    subsample_msa: bool = False  # boltz predict's CLI flag is off unless given
    num_subsampled_msa: int = 1024
    no_kernels: bool = True
    mesh: int = 1  # p: local processes when not under torchrun
    device_memory: Optional[int] = None  # bytes per device: refuse a mesh that will not fit
    strict: bool = True  # no pair tensor gathered anywhere in the model (else a warned, exact gather)
    memory_report: bool = False  # per-rank peak of each prediction (CPU: live tensors; CUDA: max allocated)
    estimate: str = "block"  # the plan's estimate: "block" (one Pairformer block, seconds) or "whole" (the prediction)
    quiet: bool = False

    @property
    def boltz2(self) -> bool:
        return self.model == "boltz2"

    def results_dir(self) -> Path:
        return Path(self.out_dir).expanduser() / f"boltz_results_{Path(self.data).expanduser().stem}"


# ----------------------------------------------------------------------------- inputs
def prepare_inputs(cfg: PredictConfig) -> dict:
    """Boltz's own input steps on this process (rank 0 only): cache / checkpoint check,
    ``check_inputs``, ``process_inputs`` into ``<out_dir>/boltz_results_<stem>/processed``.
    Returns a small summary (records, tokens per record) for the plan."""
    import boltz.main as bm
    from boltz.data.types import Manifest
    from rdkit import Chem

    Chem.SetDefaultPickleProperties(Chem.PropertyPickleOptions.AllProps)
    if cfg.seed is not None:
        _seed(cfg.seed)
    cache = Path(cfg.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    out_dir = cfg.results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    (bm.download_boltz2 if cfg.boltz2 else bm.download_boltz1)(cache)  # skips what the cache holds
    data = bm.check_inputs(Path(cfg.data).expanduser())
    bm.process_inputs(data=data, out_dir=out_dir, ccd_path=cache / "ccd.pkl", mol_dir=cache / "mols",
                      use_msa_server=False, msa_server_url="", msa_pairing_strategy="greedy", boltz2=cfg.boltz2,
                      preprocessing_threads=cfg.preprocessing_threads, max_msa_seqs=cfg.max_msa_seqs)
    manifest = Manifest.load(out_dir / "processed" / "manifest.json")
    return {"records": [r.id for r in manifest.records],
            "affinity": [r.id for r in manifest.records if getattr(r, "affinity", None)]}


def _seed(seed: int) -> None:
    from pytorch_lightning import seed_everything

    seed_everything(seed, verbose=False)


def _processed(cfg: PredictConfig, manifest):
    import boltz.main as bm

    d = cfg.results_dir() / "processed"
    opt = lambda name: (d / name) if (d / name).exists() else None  # noqa: E731
    return bm.BoltzProcessedInput(manifest=manifest, targets_dir=d / "structures", msa_dir=d / "msa",
                                  constraints_dir=opt("constraints"), template_dir=opt("templates"),
                                  extra_mols_dir=opt("mols"))


def _load_model(cfg: PredictConfig, checkpoint, predict_args: dict, affinity: bool = False):
    """``load_from_checkpoint`` with exactly the overrides ``boltz predict`` passes."""
    import boltz.main as bm
    from boltz.model.models.boltz1 import Boltz1
    from boltz.model.models.boltz2 import Boltz2

    if cfg.boltz2:
        diffusion, pairformer = bm.Boltz2DiffusionParams(), bm.PairformerArgsV2()
        diffusion.step_scale = 1.5 if cfg.step_scale is None else cfg.step_scale
    else:
        diffusion, pairformer = bm.BoltzDiffusionParams(), bm.PairformerArgs()
        diffusion.step_scale = 1.638 if cfg.step_scale is None else cfg.step_scale
    msa = bm.MSAModuleArgs(subsample_msa=cfg.subsample_msa, num_subsampled_msa=cfg.num_subsampled_msa,
                           use_paired_feature=cfg.boltz2)
    steering = bm.BoltzSteeringParams()
    steering.fk_steering = steering.physical_guidance_update = cfg.use_potentials and not affinity
    kw = dict(strict=True, predict_args=predict_args, map_location="cpu",
              diffusion_process_args=dataclasses.asdict(diffusion), ema=False,
              pairformer_args=dataclasses.asdict(pairformer), msa_args=dataclasses.asdict(msa))
    if affinity:
        steering.contact_guidance_update = False
        kw.update(steering_args=dataclasses.asdict(steering), affinity_mw_correction=cfg.affinity_mw_correction)
    else:
        kw.update(use_kernels=not cfg.no_kernels, steering_args=dataclasses.asdict(steering))
    model = (Boltz2 if cfg.boltz2 else Boltz1).load_from_checkpoint(checkpoint, **kw)
    return model.eval()


# ----------------------------------------------------------------------------- outputs
def gather_to_rank0(x, mesh):
    """A :class:`~autocp.passes.eager.TileTensor` assembled whole on rank 0 (``None`` on the
    other ranks): every rank sends its tile once (``dist.gather``), rank 0 places the tile
    of rank ``(r, c)`` at blocks ``T_r`` / ``T_c`` of its ``"r"`` / ``"c"`` dims. Layouts
    with other tags (MSA rows, atom windows) go through ``TileTensor.full()``. Must run
    inside the tile context (``ParallelBoltz.apply``)."""
    import torch
    import torch.distributed as dist

    from .layout import block_size
    from .passes.eager import TileTensor

    if not isinstance(x, TileTensor):
        return x
    if mesh.p == 1 or not set(x.tags) <= {None, "r", "c"}:
        full = x.full()
        return full if mesh.rank == 0 else None
    n = next(int(x.shape[d]) for d, t in enumerate(x.tags) if t)
    b = block_size(n, mesh.p)
    local = x.local.contiguous()
    bufs = [torch.empty_like(local) for _ in range(mesh.world_size)] if mesh.rank == 0 else None
    dist.gather(local, bufs, dst=0)
    if mesh.rank != 0:
        return None
    shape = [b * mesh.p if t else int(s) for s, t in zip(x.shape, x.tags)]
    out = local.new_zeros(shape)
    for r in range(mesh.p):
        for c in range(mesh.p):
            view = out
            for d, t in enumerate(x.tags):
                if t:
                    view = view.narrow(d, (r if t == "r" else c) * b, b)
            view.copy_(bufs[mesh.rank_of(r, c)])
    for d, t in enumerate(x.tags):
        if t:
            out = out.narrow(d, 0, int(x.shape[d]))
    return out.contiguous()


#: featurizer outputs that only the training losses read: ``disto_target`` is a one-hot
#: ``[B, N, N, K, 64]`` (O(N^2 * 64), half of z's bytes at Boltz-2's widths)
from .models.boltz_e2e import TRAINING_TARGETS  # noqa: E402 -- training-only: [N,N,64] / [R,M]

_DROP = ("s", "z")  # the trunk embeddings: O(N^2 * C); the writer does not read them


def _writer_view(pred: dict, mesh) -> Optional[dict]:
    """What the writer reads, whole on rank 0 (``None`` elsewhere); ``s`` / ``z`` dropped."""
    from torch.utils._pytree import tree_map

    out = {k: tree_map(lambda x: gather_to_rank0(x, mesh), v) for k, v in pred.items() if k not in _DROP}
    return out if mesh.rank == 0 else None


# ----------------------------------------------------------------------------- progress
class _Progress:
    """Rank 0's progress lines over the trunk passes (recycling), diffusion steps and the
    confidence head, from forward hooks on the model's own modules."""

    def __init__(self, model, cfg: PredictConfig, rank: int, samples: int, steps: int, recycling: int):
        self.on = rank == 0 and not cfg.quiet
        self.t0 = time.time()
        self.n = {"trunk": 0, "step": 0}
        self.total = {"trunk": recycling + 1, "step": steps}
        self.calls_per_step = 1
        self.handles = []
        if not self.on:
            return
        mp = cfg.max_parallel_samples or samples
        self.calls_per_step = -(-samples // mp)
        for name, key in (("pairformer_module", "trunk"), ("structure_module.score_model", "step")):
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                continue
            self.handles.append(mod.register_forward_hook(lambda *a, key=key: self.tick(key)))

    def tick(self, key: str) -> None:
        self.n[key] += 1
        done = self.n[key] // (self.calls_per_step if key == "step" else 1)
        total = self.total[key]
        every = max(1, total // 10)
        if key == "trunk" or (self.n[key] % (self.calls_per_step) == 0 and (done % every == 0 or done == total)):
            what = "trunk pass (recycling)" if key == "trunk" else "diffusion step"
            print(f"  {what} {min(done, total)}/{total}  [{time.time() - self.t0:.1f} s]", flush=True)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------- one rank
def _device(mesh):
    import torch

    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _say(rank: int, cfg: PredictConfig, msg: str) -> None:
    if rank == 0 and not cfg.quiet:
        print(msg, flush=True)


def plan_line(cfg: PredictConfig, model, n_tokens: int, n_atoms: int, mesh_p: int, batch=None) -> tuple:
    """``(text, peak_bytes)``: N, atoms, mesh and the estimated per-rank peak -- with
    ``cfg.estimate == "block"`` of one trunk block of this checkpoint at this N
    (:func:`autocp.estimate`) plus the model's parameters; with ``"whole"`` of the whole
    prediction with this run's loop flags (:func:`autocp.models.boltz_estimate.estimate_boltz`
    on the checkpoint's hyperparameters; ``batch`` gives the MSA depth and template count).
    FakeTensor, nothing allocated. Leaves the global RNG state as it found it."""
    import copy

    import torch

    from .api import estimate

    if cfg.estimate == "whole":
        return _whole_plan(cfg, model, n_tokens, n_atoms, mesh_p, batch)

    pf = model.pairformer_module
    one = copy.copy(pf)
    one._modules = dict(pf._modules)
    one.layers = torch.nn.ModuleList(list(pf.layers)[:1])
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    try:  # the estimate draws random numbers: the run's own stream must not see them (same seed, same numbers)
        with torch.random.fork_rng(devices=[]):
            est = estimate(one, n_tokens=n_tokens, mesh_shape=(mesh_p, mesh_p))
        peak = est.peak_bytes - est.params_bytes + params
        what = f"estimated per-rank peak {peak / 2**30:.3f} GiB (one Pairformer block + all parameters)"
    except Exception as e:  # noqa: BLE001 -- the plan is advisory; say why there is no number
        peak, what = None, f"no estimate ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return (f"N={n_tokens} tokens, {n_atoms} atoms, {mesh_p}x{mesh_p} mesh ({mesh_p * mesh_p} rank(s)); {what}",
            peak)


def _whole_plan(cfg: PredictConfig, model, n_tokens: int, n_atoms: int, mesh_p: int, batch=None) -> tuple:
    import torch

    from .models.boltz_estimate import PredictShape, estimate_boltz

    head = f"N={n_tokens} tokens, {n_atoms} atoms, {mesh_p}x{mesh_p} mesh ({mesh_p * mesh_p} rank(s))"
    batch = batch or {}
    msa = batch.get("msa")
    tmpl = batch.get("template_restype")
    shape = PredictShape(n_tokens, n_atoms=n_atoms or None,
                         msa_rows=int(msa.shape[1]) if isinstance(msa, torch.Tensor) else cfg.max_msa_seqs,
                         n_templates=int(tmpl.shape[1]) if isinstance(tmpl, torch.Tensor) else 1,
                         recycling_steps=cfg.recycling_steps, sampling_steps=cfg.sampling_steps,
                         diffusion_samples=cfg.diffusion_samples,
                         max_parallel_samples=cfg.max_parallel_samples or cfg.diffusion_samples)
    try:
        hp = dict(getattr(model, "hparams", {}) or {})
        if not hp:
            raise ValueError(f"{type(model).__name__} has no hyperparameters to rebuild it from")
        with torch.random.fork_rng(devices=[]):
            est = estimate_boltz(shape=shape, p=mesh_p, dtype=torch.float32, config=hp,
                                 version=1 if type(model).__name__ == "Boltz1" else 2)
        peak = est.peak_bytes
        top = max(est.per_module.items(), key=lambda kv: kv[1]["peak_bytes"])
        what = (f"estimated per-rank peak {peak / 2**30:.3f} GiB (the whole prediction, fp32; largest while "
                f"{top[0]} ran)")
    except Exception as e:  # noqa: BLE001 -- the plan is advisory; say why there is no number
        peak, what = None, f"no whole-model estimate ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return f"{head}; {what}", peak


def _check_fits(cfg: PredictConfig, model, n: int, p: int, peak) -> None:
    if cfg.device_memory is None or peak is None or peak <= cfg.device_memory:
        return
    from .mesh import MeshError

    better = None
    for q in sorted({p + 1, p + 2, 2 * p, 3 * p, 4 * p, 8 * p, 16, 32, 64}):  # a few FakeTensor estimates
        peak_q = plan_line(cfg, model, n, 0, q)[1] if p < q <= min(n, 64) else None
        if peak_q is not None and peak_q <= cfg.device_memory:
            better = q
            break
    fix = (f"run on a {better}x{better} mesh ({better * better} devices)" if better
           else "more devices or more device memory")
    raise MeshError(f"autocp predict: the estimated per-rank peak at N={n} on {p}x{p} is {_gib(peak)}; "
                    f"--device-memory is {_gib(cfg.device_memory)}. Fix: {fix}.")


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _tracker(cfg: PredictConfig, model, batch: dict, n: int, device):
    """``--memory-report``: a :class:`~autocp.memory.MemoryTracker` over the prediction
    (parameters and the batch counted); on CPU it also lists every whole pair tensor with
    channels (two dims of length N and >= 8 values per pair: O(N^2 * C)) -- none may exist."""
    import contextlib
    import math

    import torch

    from .memory import MemoryTracker

    if not cfg.memory_report:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return MemoryTracker(device="cuda")

    def whole_pair(shape) -> bool:
        dims = [i for i, d in enumerate(shape) if d == n]
        return len(dims) >= 2 and math.prod(d for i, d in enumerate(shape) if i not in dims[:2]) >= 8

    from .passes.eager import TileTensor

    held = [*model.parameters(), *(v.local if isinstance(v, TileTensor) else v for v in batch.values()
                                   if isinstance(v, torch.Tensor))]
    return MemoryTracker(track=held, flag=whole_pair)


def _run_stage(cfg: PredictConfig, mesh, stage: str, manifest, checkpoint, predict_args: dict, writer) -> dict:
    """One ``trainer.predict`` of ``boltz predict``, on the mesh: the data module's batches
    through ``predict_step`` of the parallelized model; rank 0 writes."""
    import torch

    import boltz.main as bm

    import autocp

    rank = mesh.rank
    proc = _processed(cfg, manifest)
    cache = Path(cfg.cache).expanduser()
    common = dict(manifest=manifest, msa_dir=proc.msa_dir, num_workers=cfg.num_workers,
                  constraints_dir=proc.constraints_dir)
    if cfg.boltz2:
        common.update(mol_dir=cache / "mols", template_dir=proc.template_dir, extra_mols_dir=proc.extra_mols_dir)
        if stage == "affinity":
            dm = bm.Boltz2InferenceDataModule(target_dir=cfg.results_dir() / "predictions", override_method="other",
                                              affinity=True, **common)
        else:
            dm = bm.Boltz2InferenceDataModule(target_dir=proc.targets_dir, override_method=cfg.method, **common)
    else:
        dm = bm.BoltzInferenceDataModule(target_dir=proc.targets_dir, **common)
    model = _load_model(cfg, checkpoint, predict_args, affinity=stage == "affinity")
    device = _device(mesh)
    model.to(device)
    loader = dm.predict_dataloader()
    pm = None
    stats = []
    for batch_idx, batch in enumerate(loader):
        batch = dm.transfer_batch_to_device(batch, device, 0)
        rec = batch["record"][0].id
        n, n_atoms = int(batch["token_pad_mask"].shape[1]), int(batch["atom_pad_mask"].shape[1])
        text, peak = plan_line(cfg, model, n, n_atoms, mesh.p, batch)  # plan first: refuse before any work
        _say(rank, cfg, f"[{stage}] {rec}: {text}")
        _check_fits(cfg, model, n, mesh.p, peak)
        if pm is None:
            pm = autocp.parallelize(model, mesh, strict=cfg.strict)
        for k in TRAINING_TARGETS:
            batch.pop(k, None)
        # this rank's tiles of the pair / MSA / token features; the whole batch goes
        batch = pm.distribute_features(batch)
        prog = _Progress(pm.inner, cfg, rank, predict_args["diffusion_samples"], predict_args["sampling_steps"],
                         predict_args["recycling_steps"])
        t0 = time.time()
        tracker = _tracker(cfg, model, batch, n, device)
        try:
            with torch.no_grad(), tracker:
                pred = pm.apply(lambda m, b: _writer_view(m.predict_step(b, batch_idx), mesh), batch)
        finally:
            prog.close()
        if rank == 0:
            writer.write_on_batch_end(None, None, pred, None, batch, batch_idx, 0)
        st = {"record": rec, "tokens": n, "atoms": n_atoms, "seconds": time.time() - t0,
              "failed": bool(pred["exception"]) if pred is not None else None}
        if cfg.memory_report:
            st.update(peak_bytes=tracker.peak_bytes, largest_bytes=tracker.largest_bytes,
                      largest_what=tracker.largest_what, whole_pair=tracker.flagged[:8])
            _say(rank, cfg, f"[{stage}] {rec}: rank 0 peak {tracker.peak_bytes / 2**20:.1f} MiB "
                            f"(largest tensor {tracker.largest_what})")
        stats.append(st)
        _say(rank, cfg, f"[{stage}] {rec}: done in {time.time() - t0:.1f} s")
        del pred, batch
    return {"stage": stage, "records": stats}


def predict_rank(rank: int, world: int, cfg: PredictConfig) -> dict:
    """The work of one rank (``torchrun`` process or local process): structure prediction of
    every input not yet predicted, then affinity where the input asks for it (Boltz-2)."""
    import torch
    import torch.distributed as dist

    import boltz.main as bm
    from boltz.data.types import Manifest
    from rdkit import Chem

    import autocp

    Chem.SetDefaultPickleProperties(Chem.PropertyPickleOptions.AllProps)
    torch.set_grad_enabled(False)
    torch.set_float32_matmul_precision("highest")
    mesh = autocp.init_mesh()
    warnings.filterwarnings("ignore", ".*pin_memory.*")
    if mesh.rank != 0:  # one copy of each warning (rank 0's)
        warnings.filterwarnings("ignore")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: rank 0 processes the inputs (Boltz skips done ones)
        if mesh.rank == 0:
            prepare_inputs(cfg)
        dist.barrier()
    if cfg.seed is not None:  # as boltz predict: one seed_everything, then the model is built
        _seed(cfg.seed)
    out_dir = cfg.results_dir()
    manifest = Manifest.load(out_dir / "processed" / "manifest.json")
    cache = Path(cfg.cache).expanduser()
    results = {"mesh": mesh.p, "rank": mesh.rank, "stages": []}
    structure = bm.filter_inputs_structure(manifest=manifest, outdir=out_dir, override=cfg.override)
    if structure.records:
        writer = None
        if mesh.rank == 0:
            writer = bm.BoltzWriter(data_dir=out_dir / "processed" / "structures", output_dir=out_dir / "predictions",
                                    output_format=cfg.output_format, boltz2=cfg.boltz2)
        args = {"recycling_steps": cfg.recycling_steps, "sampling_steps": cfg.sampling_steps,
                "diffusion_samples": cfg.diffusion_samples, "max_parallel_samples": cfg.max_parallel_samples,
                "write_confidence_summary": True, "write_full_pae": cfg.write_full_pae,
                "write_full_pde": cfg.write_full_pde}
        ckpt = cfg.checkpoint or cache / ("boltz2_conf.ckpt" if cfg.boltz2 else "boltz1_conf.ckpt")
        results["stages"].append(_run_stage(cfg, mesh, "structure", structure, ckpt, args, writer))
    if mesh.world_size > 1:
        dist.barrier()  # rank 0 wrote the structures the affinity stage reads
    if cfg.boltz2 and any(r.affinity for r in manifest.records):
        aff = bm.filter_inputs_affinity(manifest=manifest, outdir=out_dir, override=cfg.override)
        if aff.records:
            writer = (bm.BoltzAffinityWriter(data_dir=out_dir / "processed" / "structures",
                                             output_dir=out_dir / "predictions") if mesh.rank == 0 else None)
            args = {"recycling_steps": 5, "sampling_steps": cfg.sampling_steps_affinity,
                    "diffusion_samples": cfg.diffusion_samples_affinity, "max_parallel_samples": 1,
                    "write_confidence_summary": False, "write_full_pae": False, "write_full_pde": False}
            ckpt = cfg.affinity_checkpoint or cache / "boltz2_aff.ckpt"
            results["stages"].append(_run_stage(cfg, mesh, "affinity", aff, ckpt, args, writer))
    return results


def run_predict(cfg: PredictConfig) -> list:
    """``autocp predict``: under torchrun (``WORLD_SIZE > 1``) this process is one rank;
    otherwise Boltz's input processing runs here, then ``cfg.mesh ** 2`` local processes
    (gloo; one process for ``--mesh 1``). Returns the per-rank summaries."""
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if world_env > 1:
        return [predict_rank(int(os.environ.get("RANK", "0")), world_env, cfg)]
    t0 = time.time()
    _say(0, cfg, f"autocp predict: {cfg.data} ({cfg.model}) on a {cfg.mesh}x{cfg.mesh} mesh of local processes; "
                 f"processing inputs with Boltz's own pipeline ...")
    info = prepare_inputs(cfg)
    _say(0, cfg, f"  {len(info['records'])} input(s): {', '.join(info['records'])} ({time.time() - t0:.1f} s)")
    if cfg.mesh == 1:
        return [predict_rank(0, 1, cfg)]
    from .testing import run_distributed

    os.environ.setdefault("AUTOCP_MP_PRELOAD", "boltz.main,autocp.predict")  # imported once, not once per rank
    return run_distributed(predict_rank, cfg.mesh * cfg.mesh, cfg, timeout=float(os.environ.get(
        "AUTOCP_PREDICT_TIMEOUT", 24 * 3600)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: autocp predict INPUT ... (python -m autocp predict --help)")
