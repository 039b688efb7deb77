"""``autocp predict`` against Boltz's own predict path, and its per-rank memory.

    python benchmarks/predict_parity.py [--cache DIR] [--out benchmarks/results] [--only parity affinity torchrun memory]

Everything runs offline on the CPU from the fixture of ``scripts/make_test_cache.py``
(written to ``--cache`` when missing): tiny random-weight checkpoints with Boltz's real
depths (Boltz-2: 64 Pairformer blocks, Boltz-1: 48), the example complex
``complex_2p1l.yaml`` (2 protein chains + ATP, 99 tokens).

* parity: Boltz-1 / Boltz-2, 1 and 5 diffusion samples, 3 and 20 sampling steps, on 2x2
  and 3x3 local processes (``autocp predict --mesh p``) against ``boltz predict`` run by
  :func:`autocp.predict_compare.boltz_predict_fp32` (same checkpoint and seed, fp32):
  the largest differences of the written mmCIF coordinates, confidence JSON, PAE / PDE /
  pLDDT npz. With 3 steps the coordinates stay at ~1e3 A (every distance is past the
  confidence module's last distance bin); with 20 they are protein-like, and a pair whose
  distance lies within fp32 noise of a bin boundary can land in the neighbouring bin
  (``pae_close``: the share of PAE entries within 1e-4).
* affinity: Boltz-2 affinity input, 2x2.
* torchrun: ``torchrun --nproc-per-node 4 -m autocp predict`` (gloo).
* memory: a 2-chain + ATP complex of ``--memory-tokens`` tokens with ``--memory-report``
  on 1x1, 2x2 and 3x3: per-rank peak (live tensors incl. parameters) and the whole
  O(N^2 * C) pair tensors any rank held (must be 0).

Writes ``predict_parity.json`` and ``predict_memory.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from plotting import pyplot  # noqa: E402 -- benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

_REF = """
import json, sys
from autocp.predict_compare import boltz_predict_fp32
boltz_predict_fp32(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))
"""


def sh(cmd: list, log: Path) -> float:
    t = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=str(ROOT))
    if r.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}); see {log}:\n" + "\n".join(tail))
    return time.time() - t


def reference(data: Path, out: Path, flags: dict, log: Path) -> tuple:
    secs = sh([PY, "-c", _REF, str(data), str(out), json.dumps(flags)], log)
    return out / f"boltz_results_{data.stem}", secs


def autocp_cli(data: Path, out: Path, flags: dict, extra: list, log: Path, launcher=None) -> tuple:
    cmd = list(launcher or [PY, "-m", "autocp"]) + ["predict", str(data), "--out_dir", str(out)]
    for k, v in flags.items():
        if v is True:
            cmd.append(f"--{k}")
        elif v is not False and v is not None:
            cmd += [f"--{k}", str(v)]
    secs = sh(cmd + extra, log)
    return out / f"boltz_results_{data.stem}", secs


def flags_for(cache: Path, model: str, samples: int, steps: int, recycling: int = 1) -> dict:
    return {"cache": str(cache), "checkpoint": str(cache / f"{model}_tiny.ckpt"), "model": model,
            "recycling_steps": recycling, "sampling_steps": steps, "diffusion_samples": samples, "seed": 0,
            "override": True}


def run_parity(cache: Path, work: Path, meshes: list, quick: bool) -> list:
    from autocp.predict_compare import compare_predictions

    data = cache / "examples" / "complex_2p1l.yaml"
    rows = []
    for model in ("boltz2", "boltz1"):
        for samples in ((1,) if quick else (1, 5)):
            for steps in ((3,) if quick else (3, 20)):
                fl = flags_for(cache, model, samples, steps)
                tag = f"{model}_s{samples}_t{steps}"
                ref, rs = reference(data, work / f"ref_{tag}", dict(fl, no_kernels=True), work / f"ref_{tag}.log")
                for p in meshes:
                    out, secs = autocp_cli(data, work / f"cp_{tag}_p{p}", fl, ["--mesh", str(p)],
                                           work / f"cp_{tag}_p{p}.log")
                    d = compare_predictions(ref, out)
                    rows.append(dict(model=model, samples=samples, steps=steps, mesh=p, ref_s=rs, autocp_s=secs, **d))
                    print(f"  {tag} {p}x{p}: coords {d['coords_A']:.1e} A, confidence {d['confidence']:.1e}, "
                          f"pae {d['pae']:.1e} ({100 * d['pae_close']:.1f}% within 1e-4), pde {d['pde']:.1e}, "
                          f"plddt {d['plddt']:.1e}; boltz {rs:.0f} s, autocp {secs:.0f} s", flush=True)
    return rows


def run_affinity(cache: Path, work: Path) -> dict:
    from autocp.predict_compare import compare_predictions

    data = cache / "examples" / "complex_2p1l_affinity.yaml"
    fl = dict(flags_for(cache, "boltz2", 1, 3), affinity_checkpoint=str(cache / "boltz2_aff_tiny.ckpt"),
              sampling_steps_affinity=3, diffusion_samples_affinity=1)
    ref, rs = reference(data, work / "ref_aff", dict(fl, no_kernels=True), work / "ref_aff.log")
    out, secs = autocp_cli(data, work / "cp_aff", fl, ["--mesh", "2"], work / "cp_aff.log")
    d = compare_predictions(ref, out)
    print(f"  affinity 2x2: affinity json {d['affinity']:.1e}, coords {d['coords_A']:.1e} A, "
          f"confidence {d['confidence']:.1e}; boltz {rs:.0f} s, autocp {secs:.0f} s", flush=True)
    return dict(mesh=2, ref_s=rs, autocp_s=secs, **d)


def run_torchrun(cache: Path, work: Path) -> dict:
    from autocp.predict_compare import compare_predictions

    data = cache / "examples" / "complex_2p1l.yaml"
    fl = flags_for(cache, "boltz2", 1, 20)
    ref, rs = reference(data, work / "ref_tr", dict(fl, no_kernels=True), work / "ref_tr.log")
    launcher = [PY, "-m", "torch.distributed.run", "--nproc-per-node", "4", "-m", "autocp"]
    out, secs = autocp_cli(data, work / "cp_tr", fl, [], work / "cp_tr.log", launcher=launcher)
    d = compare_predictions(ref, out)
    print(f"  torchrun 4 (gloo): coords {d['coords_A']:.1e} A, confidence {d['confidence']:.1e}, pae {d['pae']:.1e}; "
          f"{secs:.0f} s", flush=True)
    return dict(launcher="torchrun --nproc-per-node 4", ref_s=rs, autocp_s=secs, **d)


def _big_yaml(path: Path, tokens: int) -> Path:
    aa = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWSTPSELGHAGLNGDILVWNPVLEDAFELSSMGIRVDADTLKHQLALTGDEDRLELEWHQALLRGEMPQTIGGGIGQSRLTMLLLQLPHIGQVQAGVWPAACRSTA"
    per = (tokens - 31) // 2
    text = (f"version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: {aa[:per]}\n      msa: empty\n"
            f"  - protein:\n      id: B\n      sequence: {aa[per:2 * per]}\n      msa: empty\n"
            f"  - ligand:\n      id: C\n      ccd: ATP\n")
    path.write_text(text)
    return path


def run_memory(cache: Path, work: Path, tokens: int, meshes: list) -> list:
    data = _big_yaml(work / f"complex_n{tokens}.yaml", tokens)
    rows = []
    for p in [1] + meshes:
        js = work / f"mem_p{p}.json"
        fl = dict(flags_for(cache, "boltz2", 1, 2, recycling=0), json=str(js))
        _, secs = autocp_cli(data, work / f"mem_p{p}", fl, ["--mesh", str(p), "--memory-report"], work / f"mem_p{p}.log")
        res = json.loads(js.read_text())
        recs = [r["stages"][0]["records"][0] for r in res["ranks"]]
        row = dict(mesh=p, tokens=recs[0]["tokens"], atoms=recs[0]["atoms"], seconds=secs,
                   peak_bytes=[r["peak_bytes"] for r in recs], largest=[r["largest_what"] for r in recs],
                   whole_pair=sum(len(r["whole_pair"]) for r in recs))
        rows.append(row)
        print(f"  memory N={row['tokens']} {p}x{p}: per-rank peak "
              f"{', '.join(f'{b / 2**20:.1f}' for b in row['peak_bytes'])} MiB; whole pair tensors {row['whole_pair']}; "
              f"{secs:.0f} s", flush=True)
    return rows


def memory_ratios(rows: list, params: int) -> None:
    """single-process peak / max per-rank peak, with and without the (replicated) parameters."""
    single = rows[0]["peak_bytes"][0]
    for r in rows:
        r["ratio"] = single / max(r["peak_bytes"])
        r["ratio_wo_params"] = (single - params) / (max(r["peak_bytes"]) - params)
        print(f"  memory {r['mesh']}x{r['mesh']}: ratio {r['ratio']:.2f}, without parameters "
              f"{r['ratio_wo_params']:.2f} (P = {r['mesh'] ** 2})")


def _plot(rows: list, params_bytes: int, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ps = [r["mesh"] ** 2 for r in rows]
    ax.plot(ps, [max(r["peak_bytes"]) / 2**20 for r in rows], "o-", label="max per-rank peak")
    base = rows[0]["peak_bytes"][0]
    ax.plot(ps, [base / p / 2**20 for p in ps], "--", label="single / P")
    if params_bytes:
        ax.axhline(params_bytes / 2**20, color="gray", ls=":", label="parameters (replicated)")
    ax.set_xlabel("ranks P")
    ax.set_ylabel("MiB")
    ax.set_title(f"autocp predict, Boltz-2 tiny widths, N={rows[0]['tokens']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/autocp_predict_cache")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--work", default="/tmp/autocp_predict_bench")
    ap.add_argument("--only", nargs="+", default=["parity", "affinity", "torchrun", "memory"])
    ap.add_argument("--mesh", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--memory-tokens", type=int, default=201)
    ap.add_argument("--quick", action="store_true", help="parity: 1 sample, 3 steps only")
    args = ap.parse_args()
    cache, work, out = Path(args.cache), Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not (cache / "boltz2_tiny.ckpt").exists():
        sh([PY, str(ROOT / "scripts" / "make_test_cache.py"), str(cache)], work / "cache.log")
    path = out / "predict_parity.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res.update(machine=f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS=1, gloo", date=time.strftime("%Y-%m-%d"))
    if "parity" in args.only:
        res["parity"] = run_parity(cache, work, args.mesh, args.quick)
    if "affinity" in args.only:
        res["affinity"] = run_affinity(cache, work)
    if "torchrun" in args.only:
        res["torchrun"] = run_torchrun(cache, work)
    if "memory" in args.only:
        res["memory"] = run_memory(cache, work, args.memory_tokens, args.mesh)
        import torch

        params = sum(v.numel() * v.element_size() for v in torch.load(cache / "boltz2_tiny.ckpt", map_location="cpu",
                                                                        weights_only=False)["state_dict"].values())
        res["memory_params_bytes"] = params
        memory_ratios(res["memory"], params)
        _plot(res["memory"], params, out / "predict_memory.png")
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
