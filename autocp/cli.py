"""Command line: ``autocp demo | estimate | explain | bench`` (also ``python -m autocp ...``).

    autocp demo                                   # 2x2 CPU mesh: Boltz-2 (MSA + Pairformer) via autocp.parallelize
    autocp demo --mesh 3 --tokens 40 --blocks 1
    autocp estimate --tokens 30000 --device-memory 80GiB --dtype bf16
    autocp explain --format text|dot|graphml
    autocp bench memory|comm|speed --out benchmarks/results

Arguments are parsed (and checked) before torch is imported, so ``--help`` and bad
arguments answer at once; a bad argument prints one line on stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

__all__ = ["main", "build_model", "parse_bytes"]

FULL_MODEL = "boltz2-full"
MODELS_HELP = ("boltz2 (Boltz-2 trunk: MSAModule + PairformerModule), boltz1 (Boltz-1 PairformerModule), "
               "boltz2-full (estimate only: the whole Boltz-2 prediction at the released configuration), "
               "or PATH.py:factory (factory() returns a model, or (model, make_inputs) with make_inputs(n) -> "
               "example inputs at n tokens)")


class UsageError(Exception):
    """A bad command-line argument: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- argument types
def _positive_int(what: str, fix: str):
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: given {text!r}; required a positive integer. Fix: {fix}.")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{what}: given {v}; required a positive integer (>= 1). Fix: {fix}.")
        return v

    return conv


def _mesh_side(text: str) -> int:
    """``2`` or ``2x2`` -> 2; ``2x3`` is refused (autocp meshes are square)."""
    m = re.fullmatch(r"\s*(-?\d+)\s*(?:[xX*]\s*(-?\d+)\s*)?", text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"--mesh: given {text!r}; required the side p of a square p x p mesh (e.g. 2 or 2x2). Fix: --mesh 2.")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) is not None else a
    if a != b:
        raise argparse.ArgumentTypeError(
            f"--mesh: given a non-square {a}x{b} mesh; required a square p x p mesh (autocp tiles the pair "
            f"representation over rows and columns of equal count). Fix: --mesh {min(a, b)} or --mesh {max(a, b)}.")
    if a <= 0:
        raise argparse.ArgumentTypeError(f"--mesh: given {a}; required a mesh side p >= 1. Fix: --mesh 2.")
    return a


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"80GiB"`` -> 85899345920; units B, KB/MB/GB/TB (10^3), KiB/MiB/GiB/TiB (2^10)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"--device-memory: given {text!r}; required a size such as 80GiB, 40GB, 512MiB or a byte count. "
            f"Fix: --device-memory 80GiB.")
    v = float(m.group(1)) * _UNITS[unit]
    if v <= 0:
        raise argparse.ArgumentTypeError(f"--device-memory: given {text!r}; required a size > 0. Fix: --device-memory 80GiB.")
    return int(v)


def _model_spec(text: str) -> str:
    if text in ("boltz2", "boltz1", FULL_MODEL):
        return text
    if ":" in text:
        path, _, fn = text.rpartition(":")
        if path.endswith(".py") and fn.isidentifier():
            if not os.path.isfile(path):
                raise argparse.ArgumentTypeError(f"--model: given {text!r}; the file {path} does not exist. "
                                                 f"Fix: the path of a python file defining {fn}().")
            return text
    raise argparse.ArgumentTypeError(f"--model: given {text!r}; required {MODELS_HELP}. Fix: --model boltz2.")


def _nonneg_int(what: str):
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = -1
        if v < 0:
            raise argparse.ArgumentTypeError(f"{what}: given {text!r}; required an int >= 0. Fix: {what} 3.")
        return v

    return conv


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage block
        message = re.sub(r"^argument [^:]+: (?=--)", "", message)  # our checks name the option themselves
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="autocp", description="autocp: 2D context parallelism for AlphaFold3-like models "
                 "(a compiler: autocp.parallelize).", formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="Run 'autocp <command> --help' for a command's options.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{demo,predict,estimate,explain,bench}", parser_class=_Parser)
    tokens = _positive_int("--tokens", "--tokens 64")
    blocks = _positive_int("--blocks", "--blocks 2")
    chans = _positive_int("--channels", "--channels 16")

    d = sub.add_parser("demo", help="a random-weight Boltz-2 model on a local CPU mesh: single device vs "
                       "autocp.parallelize (error, per-rank memory, explain)",
                       description="Start a p x p gloo mesh of CPU processes (no torchrun), build a random-weight "
                       "model (default Boltz-2: MSAModule + PairformerModule, every parameter re-drawn), run it on "
                       "one device and through autocp.parallelize, and print the max error, the per-rank peak "
                       "memory and ratio, and the explain() report; write a PNG of the memory.")
    d.add_argument("--mesh", "--p", dest="mesh", type=_mesh_side, default=2, help="mesh side p (p x p processes, 1..4), default 2")
    d.add_argument("--tokens", "--n", dest="tokens", type=tokens, default=63, help="tokens N (>= p), default 63")
    d.add_argument("--blocks", type=blocks, default=2, help="Pairformer blocks (and MSA blocks = 1), default 2")
    d.add_argument("--channels", "--c", dest="channels", type=chans, default=16,
                   help="pair channels C (single 3C, MSA C), default 16")
    d.add_argument("--msa-rows", type=_positive_int("--msa-rows", "--msa-rows 8"), default=7, help="MSA rows S, default 7")
    d.add_argument("--model", type=_model_spec, default="boltz2", help=MODELS_HELP)
    d.add_argument("--png", default="autocp_demo_memory.png", help="memory plot path (needs matplotlib), "
                   "default ./autocp_demo_memory.png; '' for none")
    d.add_argument("--json", default=None, help="also write the results to this JSON file")

    _predict_parser(sub)

    e = sub.add_parser("estimate", help="per-rank peak memory per mesh size, and the smallest mesh that fits (no devices)",
                       description="Per-rank peak memory of the parallelized model from FakeTensor runs (autocp.estimate; "
                       "nothing is allocated), as a table over square mesh sizes, and the smallest square mesh whose "
                       "per-rank peak fits --device-memory.")
    e.add_argument("--tokens", "--n", dest="tokens", type=tokens, required=True, help="tokens N")
    e.add_argument("--device-memory", type=parse_bytes, default=None, help="memory per device, e.g. 80GiB")
    e.add_argument("--model", type=_model_spec, default="boltz2", help=MODELS_HELP)
    e.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="activation dtype, default fp32")
    e.add_argument("--train", action="store_true", help="one training step (forward + backward), not inference")
    e.add_argument("--mesh", type=_mesh_side, nargs="+", default=None,
                   help="mesh sides p to tabulate (default: the sides the search visits)")
    e.add_argument("--max-mesh", type=_mesh_side, default=None,
                   help="largest side p searched for a fit, default 64 (boltz2-full: 16; each side takes minutes, "
                        "more for large p)")
    e.add_argument("--blocks", type=blocks, default=1, help="Pairformer blocks, default 1 (the forward peak is one "
                   "block's; --train stores every block's activations)")
    e.add_argument("--channels", type=chans, default=128, help="pair channels C (Boltz-2: 128; single 3C, MSA C/2)")
    e.add_argument("--msa-rows", type=_positive_int("--msa-rows", "--msa-rows 1024"), default=None,
                   help="MSA rows S (boltz2: default 1024; boltz2-full: default 8192, boltz predict's "
                   "--max_msa_seqs; the model keeps 1024)")
    full = e.add_argument_group("boltz2-full (the whole prediction; defaults: boltz predict's)")
    full.add_argument("--atoms", type=_positive_int("--atoms", "--atoms 270000"), default=None,
                      help="atoms M, default 9 per token")
    full.add_argument("--recycling-steps", type=_nonneg_int("--recycling-steps"), default=3, help="default 3")
    full.add_argument("--sampling-steps", type=_positive_int("--sampling-steps", "--sampling-steps 200"), default=200,
                      help="default 200")
    full.add_argument("--diffusion-samples", type=_positive_int("--diffusion-samples", "--diffusion-samples 5"),
                      default=1, help="default 1")
    full.add_argument("--max-parallel-samples", type=_positive_int("--max-parallel-samples",
                      "--max-parallel-samples 5"), default=5, help="default 5")
    full.add_argument("--table", action="store_true", help="print the per-module table of each mesh estimated")

    x = sub.add_parser("explain", help="the rewritten-graph report of autocp.parallelize (1x1 mesh, in-process)",
                       description="Compile the model with autocp.parallelize on a 1x1 mesh in this process and print "
                       "the report: every rewritten module, its rule, layouts, comm per call (text), or the "
                       "annotated graph (dot, graphml).")
    x.add_argument("--model", type=_model_spec, default="boltz2", help=MODELS_HELP)
    x.add_argument("--format", choices=("text", "dot", "graphml"), default="text", help="default text")
    x.add_argument("--tokens", type=tokens, default=13, help="example token length, default 13")
    x.add_argument("--blocks", type=blocks, default=2, help="Pairformer blocks, default 2")
    x.add_argument("--channels", type=chans, default=16, help="pair channels, default 16")
    x.add_argument("--out", default=None, help="write to this file instead of stdout (graphml: default autocp_graph.graphml)")

    b = sub.add_parser("bench", help="memory / comm / speed benchmarks: JSON + PNG",
                       description="memory: per-rank peak vs N for P = 1, 4, 9 against O(N^2/P) and O(N^2/sqrt(P)); "
                       "comm: bytes per layer, measured vs the ops' analytic volume; speed: forward time of "
                       "autocp.parallelize on a 1x1 mesh vs the original module. Boltz-2 PairformerModule, CPU gloo.")
    b.add_argument("what", choices=("memory", "comm", "speed"))
    b.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder, default benchmarks/results")
    b.add_argument("--tokens", type=tokens, nargs="+", default=None, help="token lengths N (default: small sizes)")
    b.add_argument("--mesh", type=_mesh_side, nargs="+", default=None, help="mesh sides (default 1 2 3; comm: 2 3)")
    b.add_argument("--blocks", type=blocks, default=1, help="Pairformer blocks, default 1")
    b.add_argument("--channels", type=chans, default=16, help="pair channels, default 16")
    b.add_argument("--repeat", type=_positive_int("--repeat", "--repeat 3"), default=3, help="speed: timed runs, default 3")
    return ap


def _flag(parser, name: str, help: str) -> None:
    parser.add_argument(name, action="store_true", help=help)


def _predict_parser(sub) -> None:
    """``autocp predict``: ``boltz predict``'s flags (same names, same defaults) + the mesh."""
    steps = lambda what, ex: _positive_int(what, ex)  # noqa: E731
    q = sub.add_parser("predict", help="fold a complex from Boltz's own inputs (YAML / FASTA / directory) on a p x p "
                       "mesh; writes what `boltz predict` writes",
                       description="Boltz's own input processing, featurizer, checkpoint loading and writers, with "
                       "the model through autocp.parallelize: pair tensors stay 2D tiles (O(N^2/P) per rank), only "
                       "coordinates, pLDDT, PAE / PDE and the confidence / affinity summaries are assembled, on "
                       "rank 0. Under torchrun the mesh is the world size; otherwise --mesh p starts p*p local "
                       "CPU processes (gloo). Offline try-out: python scripts/make_test_cache.py DIR, then "
                       "autocp predict DIR/examples/complex_2p1l.yaml --cache DIR --checkpoint DIR/boltz2_tiny.ckpt "
                       "--mesh 2 --sampling_steps 10.")
    q.add_argument("data", help="a YAML / FASTA input file or a directory of them (Boltz's input format)")
    q.add_argument("--out_dir", default="./", help="output directory (boltz_results_<name>/ inside), default ./")
    q.add_argument("--cache", default=os.environ.get("BOLTZ_CACHE", "~/.boltz"),
                   help="Boltz's cache (mols/ or ccd.pkl, checkpoints), default $BOLTZ_CACHE or ~/.boltz")
    q.add_argument("--checkpoint", default=None, help="model checkpoint, default <cache>/boltz2_conf.ckpt "
                   "(boltz1: boltz1_conf.ckpt)")
    q.add_argument("--affinity_checkpoint", default=None, help="affinity checkpoint, default <cache>/boltz2_aff.ckpt")
    q.add_argument("--model", choices=("boltz2", "boltz1"), default="boltz2", help="default boltz2")
    q.add_argument("--recycling_steps", type=int, default=3, help="default 3")
    q.add_argument("--sampling_steps", type=steps("--sampling_steps", "--sampling_steps 200"), default=200,
                   help="default 200")
    q.add_argument("--diffusion_samples", type=steps("--diffusion_samples", "--diffusion_samples 1"), default=1,
                   help="default 1")
    q.add_argument("--sampling_steps_affinity", type=steps("--sampling_steps_affinity", "--sampling_steps_affinity 200"),
                   default=200, help="default 200")
    q.add_argument("--diffusion_samples_affinity", type=steps("--diffusion_samples_affinity",
                   "--diffusion_samples_affinity 3"), default=3, help="default 3")
    q.add_argument("--max_parallel_samples", type=steps("--max_parallel_samples", "--max_parallel_samples 1"),
                   default=None, help="samples run at once, default all")
    q.add_argument("--step_scale", type=float, default=None, help="default 1.5 (boltz2), 1.638 (boltz1)")
    q.add_argument("--output_format", choices=("mmcif", "pdb"), default="mmcif", help="default mmcif")
    q.add_argument("--num_workers", type=int, default=0, help="data loader workers, default 0")
    q.add_argument("--seed", type=int, default=None, help="seed (the same seed gives boltz predict's numbers at fp32)")
    q.add_argument("--method", default=None, help="Boltz-2 method conditioning (e.g. x-ray diffraction)")
    q.add_argument("--preprocessing-threads", "--preprocessing_threads", dest="preprocessing_threads", type=int,
                   default=1, help="default 1")
    q.add_argument("--max_msa_seqs", type=int, default=8192, help="default 8192")
    q.add_argument("--num_subsampled_msa", type=int, default=1024, help="default 1024")
    for name, h in (("--write_full_pae", "write the PAE npz"), ("--write_full_pde", "write the PDE npz"),
                    ("--override", "predict again inputs that have outputs"),
                    ("--use_potentials", "inference-time steering potentials"),
                    ("--affinity_mw_correction", "molecular-weight correction of the affinity value"),
                    ("--subsample_msa", "subsample the MSA (boltz predict: on)")):
        _flag(q, name, h)
    q.add_argument("--mesh", "--p", dest="mesh", type=_mesh_side, default=None,
                   help="mesh side p: p*p local CPU processes (without torchrun), default 1")
    q.add_argument("--device-memory", "--device_memory", dest="device_memory", type=parse_bytes, default=None,
                   help="memory per device (e.g. 80GiB): refuse a mesh whose estimated per-rank peak exceeds it, "
                   "naming the mesh that fits")
    q.add_argument("--no-strict", dest="strict", action="store_false",
                   help="let a pair tensor run gathered (warned, exact) instead of refusing it")
    q.add_argument("--memory-report", "--memory_report", dest="memory_report", action="store_true",
                   help="per-rank peak memory of each prediction (CPU: live tensors; CUDA: max allocated) and a "
                   "check that no rank held a whole O(N^2 * C) pair tensor")
    q.add_argument("--estimate", choices=("block", "whole"), default="block",
                   help="the per-rank peak printed (and checked against --device-memory) before each prediction: "
                   "'block' one Pairformer block + parameters (seconds), 'whole' the whole prediction with these "
                   "loop flags (minutes at 30k tokens; docs/memory.md)")
    q.add_argument("--json", default=None, help="write the per-rank summaries (timings, memory) to this JSON file")
    q.add_argument("--use_msa_server", action="store_true", help=argparse.SUPPRESS)
    q.add_argument("--write_embeddings", action="store_true", help=argparse.SUPPRESS)


def _check(args) -> None:
    """Checks across arguments (still before torch is imported)."""
    if args.cmd == "predict":
        _check_predict(args)
        return
    if getattr(args, "model", "boltz2") in ("boltz2", "boltz1") and hasattr(args, "channels"):
        w = _widths(args.channels)
        widths = {w["cs"], w["cz"], w["cm"]}
        for n in (args.tokens if isinstance(args.tokens, list) else [args.tokens]) if args.tokens else ():
            if n in widths:
                print(f"autocp {args.cmd}: note: N={n} equals a channel width of the model ({sorted(widths)}); "
                      f"input layouts guessed by shape cannot tell that channel axis from a token axis (autocp "
                      f"refuses to guess and asks for input_layouts). Use another N to avoid it.", file=sys.stderr)
    if args.cmd == "demo":
        if args.mesh > 4:
            raise UsageError(f"--mesh: given {args.mesh} ({args.mesh ** 2} local processes); the demo runs at most a "
                             f"4x4 mesh of CPU processes on this machine. Fix: --mesh 2 or --mesh 3.")
        if args.tokens < args.mesh:
            raise UsageError(f"--tokens: given {args.tokens} tokens for a {args.mesh}x{args.mesh} mesh; required N >= p "
                             f"(every mesh row/column needs a token). Fix: --tokens {max(4 * args.mesh, 8)}.")
        if args.tokens < 3:
            raise UsageError(f"--tokens: given {args.tokens}; the demo masks 2 tokens, so it needs N >= 3. Fix: --tokens 16.")
    if getattr(args, "model", None) == FULL_MODEL and args.cmd != "estimate":
        raise UsageError(f"--model boltz2-full: given with '{args.cmd}'; it is only an estimate target. Fix: "
                         f"autocp estimate --model boltz2-full --tokens N --mesh p, or autocp predict INPUT to fold.")
    if args.cmd == "estimate":
        if args.model == FULL_MODEL and args.train:
            raise UsageError("estimate: --model boltz2-full estimates inference only; given --train. "
                             "Fix: drop --train, or estimate the trunk (--model boltz2 --train).")
        for p in args.mesh or ():
            if args.tokens < p:
                raise UsageError(f"--tokens: given {args.tokens} tokens for a {p}x{p} mesh; required N >= p. "
                                 f"Fix: --mesh {args.tokens} or more tokens.")
        if args.mesh is None and args.device_memory is None:
            raise UsageError("estimate: given neither --mesh nor --device-memory; required at least one. "
                             "Fix: --device-memory 80GiB (search the smallest mesh) or --mesh 4 8 (tabulate).")
    if args.cmd == "bench":
        for p in args.mesh or ():
            if p > 3:
                raise UsageError(f"--mesh: given {p} ({p * p} local processes); bench runs at most 3x3 on CPU. "
                                 f"Fix: --mesh 1 2 3.")
        for n in args.tokens or ():
            for p in args.mesh or (1, 2, 3):
                if n < p:
                    raise UsageError(f"--tokens: given {n} tokens for a {p}x{p} mesh; required N >= p. Fix: --tokens 16 32.")


def _check_predict(args) -> None:
    if not os.path.exists(os.path.expanduser(args.data)):
        raise UsageError(f"INPUT: given {args.data!r}, which does not exist; required a YAML / FASTA file or a "
                         f"directory of them. Fix: the path of your input (an example: python "
                         f"scripts/make_test_cache.py DIR writes DIR/examples/*.yaml).")
    for flag in ("checkpoint", "affinity_checkpoint"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(os.path.expanduser(path)):
            raise UsageError(f"--{flag}: given {path!r}, which is not a file; required a Boltz Lightning checkpoint. "
                             f"Fix: the path of a .ckpt (or leave it out: <cache>/boltz2_conf.ckpt, "
                             f"boltz2_aff.ckpt, boltz1_conf.ckpt).")
    if args.use_msa_server:
        raise UsageError("--use_msa_server: autocp predict does not query an MSA server. Fix: compute the MSA once "
                         "(boltz predict --use_msa_server, or any .a3m), and give its path under `msa:` in the YAML "
                         "(or `msa: empty`).")
    if args.write_embeddings:
        raise UsageError("--write_embeddings: writing s and z would assemble the O(N^2 * C) pair tensor on one "
                         "rank, which autocp predict never does. Fix: leave the flag out.")
    if args.recycling_steps < 0:
        raise UsageError(f"--recycling_steps: given {args.recycling_steps}; required >= 0. Fix: --recycling_steps 3.")
    if args.num_workers < 0:
        raise UsageError(f"--num_workers: given {args.num_workers}; required >= 0. Fix: --num_workers 0.")
    world = os.environ.get("WORLD_SIZE")
    if world is not None and int(world) > 1:
        w = int(world)
        side = int(round(w ** 0.5))
        if side * side != w:
            raise UsageError(f"torchrun: given world size {w}; autocp needs a p x p mesh (1, 4, 9, 16, ... ranks). "
                             f"Fix: torchrun --nproc-per-node {side * side} (or {(side + 1) ** 2}).")
        if args.mesh not in (None, side):
            raise UsageError(f"--mesh: given {args.mesh} under torchrun with world size {w} (a {side}x{side} mesh). "
                             f"Fix: leave --mesh out under torchrun (the world size sets it).")
    elif args.mesh is not None and args.mesh > 4:
        raise UsageError(f"--mesh: given {args.mesh} ({args.mesh ** 2} local processes); without torchrun autocp "
                         f"predict starts at most 4x4 local CPU processes. Fix: torchrun --nproc-per-node "
                         f"{args.mesh ** 2} -m autocp predict ... on GPUs.")


def predict_cmd(args) -> int:
    import dataclasses

    from .predict import PredictConfig, run_predict

    fields = set(PredictConfig.__dataclass_fields__)
    kw = {k: v for k, v in vars(args).items() if k in fields}
    kw["mesh"] = args.mesh or 1
    t0 = time.time()
    cfg = PredictConfig(**kw)
    res = run_predict(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        out = cfg.results_dir() / "predictions"
        failed = [r["record"] for x in res[:1] for st in x["stages"] for r in st["records"] if r["failed"]]
        if args.memory_report and len(res) > 1:
            for i, st in enumerate(res[0]["stages"]):
                for j, r in enumerate(st["records"]):
                    peaks = [x["stages"][i]["records"][j]["peak_bytes"] for x in res]
                    whole = sum(len(x["stages"][i]["records"][j]["whole_pair"]) for x in res)
                    print(f"[{st['stage']}] {r['record']}: per-rank peak {', '.join(f'{b / 2**20:.1f}' for b in peaks)} "
                          f"MiB; whole O(N^2*C) pair tensors on any rank: {whole}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": dataclasses.asdict(cfg), "ranks": res, "seconds": time.time() - t0}, f,
                          indent=1, default=str)
        print(f"autocp predict: wrote {out} ({time.time() - t0:.1f} s)" +
              (f"; FAILED (Boltz skipped them): {failed}" if failed else ""))
        return 1 if failed else 0
    return 0


# ----------------------------------------------------------------------------- models
def _widths(c: int) -> dict:
    """Boltz-like widths from the pair channels C (C=128 gives Boltz-2's 384 / 128 / 64, 16 heads)."""
    cs = 3 * c
    heads = next((h for h in (16, 8, 4, 2) if cs % h == 0 and cs // h >= 12), 1)
    big = c >= 64
    return dict(cs=cs, cz=c, cm=max(c // 2, 8) if big else c, heads=heads,
                pw_width=32 if big else 8, pw_heads=4 if big else 2)


_MSA_KEYS = ("msa", "has_deletion", "deletion_value", "msa_paired", "msa_mask", "token_pad_mask")
_CLASSES = {}


def _boltz2_trunk_cls():
    """Boltz-2's trunk core: ``z = z + msa_module(z, s, feats)``; ``s, z = pairformer(s, z, mask, pair_mask)``.

    Forward takes the MSA features as flat tensors (autocp.estimate takes positional tensors)."""
    if "boltz2" not in _CLASSES:
        from boltz.model.layers.pairformer import PairformerModule
        from boltz.model.modules.trunkv2 import MSAModule
        from torch import nn

        class Boltz2Trunk(nn.Module):
            def __init__(self, cs, cz, cm, heads, pw_width, pw_heads, blocks, msa_blocks=1):
                super().__init__()
                self.msa_module = MSAModule(msa_s=cm, token_z=cz, token_s=cs, msa_blocks=msa_blocks, msa_dropout=0.0,
                                            z_dropout=0.0, pairwise_head_width=pw_width, pairwise_num_heads=pw_heads)
                self.pairformer = PairformerModule(cs, cz, blocks, num_heads=heads, dropout=0.0, v2=True,
                                                   pairwise_head_width=pw_width, pairwise_num_heads=pw_heads)

            def forward(self, s, z, mask, pair_mask, msa, has_deletion, deletion_value, msa_paired, msa_mask,
                        token_pad_mask):
                feats = dict(msa=msa, has_deletion=has_deletion, deletion_value=deletion_value,
                             msa_paired=msa_paired, msa_mask=msa_mask, token_pad_mask=token_pad_mask)
                z = z + self.msa_module(z, s, feats)
                return self.pairformer(s, z, mask, pair_mask)

        _CLASSES["boltz2"] = Boltz2Trunk
    return _CLASSES["boltz2"]


def randomize_(model, seed: int) -> None:
    """Re-draw every parameter from a seeded generator (Boltz zero-inits output projections,
    which would make the blocks identities): weights ~ N(0, 1/fan_in), 1-D ~ 1 +- 0.1 or 0 +- 0.1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                prm.copy_(base + 0.1 * torch.randn(prm.shape, generator=g))
            else:
                prm.copy_(torch.randn(prm.shape, generator=g) / max(prm.shape[-1], 1) ** 0.5)


def _load_factory(spec: str):
    import importlib.util

    path, _, fn = spec.rpartition(":")
    modname = "autocp_user_model_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    mspec = importlib.util.spec_from_file_location(modname, os.path.abspath(path))
    mod = importlib.util.module_from_spec(mspec)
    sys.modules[modname] = mod
    mspec.loader.exec_module(mod)
    if not callable(getattr(mod, fn, None)):
        raise UsageError(f"--model: given {spec!r}; {path} defines no callable {fn}. "
                         f"Fix: define def {fn}(): return model  (or (model, make_inputs)).")
    return getattr(mod, fn)


def build_model(spec: str, *, channels: int, blocks: int, msa_rows: int = 7, seed: int = 0):
    """``(model, make_inputs, description)``; ``make_inputs(n, meta=False)`` -> example
    inputs at ``n`` tokens (real: random features, 2 masked tokens; meta: shapes only)."""
    import torch

    w = _widths(channels)
    if spec == "boltz2":
        model = _boltz2_trunk_cls()(w["cs"], w["cz"], w["cm"], w["heads"], w["pw_width"], w["pw_heads"], blocks)
        desc = (f"Boltz-2 trunk: MSAModule (1 block, msa_s={w['cm']}, {msa_rows} MSA rows) + PairformerModule "
                f"({blocks} block{'s' if blocks > 1 else ''}, token_s={w['cs']}, token_z={w['cz']}, {w['heads']} heads)")
    elif spec == "boltz1":
        from boltz.model.modules.trunk import PairformerModule

        model = PairformerModule(w["cs"], w["cz"], blocks, num_heads=w["heads"], dropout=0.0,
                                 pairwise_head_width=w["pw_width"], pairwise_num_heads=w["pw_heads"])
        desc = (f"Boltz-1 PairformerModule ({blocks} blocks, token_s={w['cs']}, token_z={w['cz']}; Boltz-1's "
                f"MSA module is not registered with autocp yet, so it is left out)")
    else:
        out = _load_factory(spec)()
        model, make = (out if isinstance(out, tuple) else (out, None))
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"--model: {spec} returned {type(model).__name__}; required an nn.Module or "
                             f"(nn.Module, make_inputs). Fix: return the model.")
        randomize_(model, seed)
        return model.eval(), _user_inputs(model, make), f"{type(model).__name__} from {spec}"
    randomize_(model, seed)
    model._autocp_cli_inputs = ("s", "z", "mask", "pair_mask") + (_MSA_KEYS if spec == "boltz2" else ())
    return model.eval(), _builtin_inputs(spec, w, msa_rows), desc


def input_layouts(model):
    """Explicit input layouts for the built-in models (by argument name), so that a token
    length equal to a channel width is not mistaken for a token axis; None otherwise."""
    from .layout import MsaTiles, Pair2D, RowToken

    names = getattr(model, "_autocp_cli_inputs", None)
    if names is None:
        return None
    lay = {"s": RowToken(), "z": Pair2D(), "mask": RowToken(), "pair_mask": Pair2D(), "token_pad_mask": RowToken()}
    return {k: lay.get(k, MsaTiles()) for k in names}


def _builtin_inputs(spec, w, msa_rows):
    def make(n, meta=False, dtype=None):
        import torch

        dtype = dtype or torch.float32
        if meta:
            def e(*shape, dt=dtype):
                return torch.empty(*shape, dtype=dt, device="meta")

            base = (e(1, n, w["cs"]), e(1, n, n, w["cz"]), e(1, n), e(1, n, n))
            if spec != "boltz2":
                return base
            S = msa_rows
            return base + (e(1, S, n, dt=torch.long), e(1, S, n), e(1, S, n), e(1, S, n), e(1, S, n, dt=torch.long),
                           e(1, n, dt=torch.long))
        g = torch.Generator().manual_seed(1)
        s = torch.randn(1, n, w["cs"], generator=g)
        z = torch.randn(1, n, n, w["cz"], generator=g)
        tok = torch.ones(1, n)
        tok[:, -2:] = 0  # two padding tokens of the model's own
        base = (s, z, tok, tok[:, :, None] * tok[:, None, :])
        if spec != "boltz2":
            return base
        from boltz.data import const

        S = msa_rows
        msa_mask = (torch.rand(1, S, n, generator=g) > 0.2).long()
        msa_mask[:, 0] = 1
        return base + (torch.randint(0, const.num_tokens, (1, S, n), generator=g),
                       (torch.rand(1, S, n, generator=g) > 0.7).float(), torch.rand(1, S, n, generator=g),
                       (torch.rand(1, S, n, generator=g) > 0.5).float(), msa_mask, tok.long())

    return make


def _user_inputs(model, make):
    def inputs(n, meta=False, dtype=None):
        import torch

        if make is None:
            from .passes.estimate import default_inputs

            xs = default_inputs(model, n, dtype or torch.float32)
        else:
            xs = make(n)
        xs = tuple(xs) if isinstance(xs, (tuple, list)) else (xs,)
        if meta:
            return tuple(torch.empty(t.shape, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype,
                                     device="meta") if isinstance(t, torch.Tensor) else t for t in xs)
        g = torch.Generator().manual_seed(1)
        out = []
        for t in xs:
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                feature = t.is_floating_point() and t.dim() >= 3 and not (t.dim() == 3 and t.shape[1] == t.shape[2])
                t = torch.randn(t.shape, generator=g).to(t.dtype) if feature else torch.ones(t.shape, dtype=t.dtype)
            out.append(t)
        return tuple(out)

    return inputs


# ----------------------------------------------------------------------------- demo
def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def _demo_rank(rank: int, world: int, spec: str, n: int, blocks: int, channels: int, msa_rows: int) -> dict:
    import warnings

    import torch

    import autocp

    mesh = autocp.init_mesh()
    t0 = time.time()
    model, make, desc = build_model(spec, channels=channels, blocks=blocks, msa_rows=msa_rows)
    inputs = make(n)
    res = {"coord": mesh.coord, "desc": desc}
    if rank == 0:  # the single-device reference (one copy is enough)
        _say(rank, f"[2/5] single-device forward of the original model ...")
        with torch.no_grad(), autocp.MemoryTracker(track=[*model.parameters(), *inputs]) as mt:
            ref = model(*inputs)
        res["peak_single"] = mt.peak_bytes
        ref = ref if isinstance(ref, tuple) else (ref,)
        res["seconds_single"] = time.time() - t0
    _say(rank, f"[3/5] autocp.parallelize on the {mesh.p}x{mesh.p} mesh (capture, claim, shard) ...")
    t1 = time.time()
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        pm = autocp.parallelize(model, mesh, example_inputs=inputs, input_layouts=input_layouts(model))
    res["compile_s"] = time.time() - t1
    res["warnings"] = sorted({str(w.message) for w in wl})
    res["actions"] = {k: a.action for k, a in pm.plan.actions.items()}
    _say(rank, "[4/5] parallel forward: per-rank peak memory on this rank's tiles, then full outputs ...")
    with torch.no_grad():
        local = list(pm.to_tiles(*inputs)[0])
        tiles = [x.to_local() if hasattr(x, "to_local") else x for x in local]
        t2 = time.time()
        with autocp.MemoryTracker(track=[*model.parameters(), *(t for t in tiles if isinstance(t, torch.Tensor))]) as mt:
            out_local = pm(*local, output="local")
        res["seconds_parallel"] = time.time() - t2
        res["peak_rank"] = mt.peak_bytes
        del out_local
        out = pm(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    if rank == 0:
        res["outputs"] = [{"shape": list(o.shape), "max_abs_err": float((o - r).abs().max()),
                           "scale": float(r.abs().max())} for o, r in zip(out, ref)]
        res["explain"] = pm.explain()
    return res


def _plot_memory(path: str, single: float, ranks: list, p: int, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG written (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["1 device"] + [f"rank ({r},{c})" for r, c in ranks[1]]
    vals = [single / 2**20] + [v / 2**20 for v in ranks[0]]
    ax.bar(labels, vals, color=["tab:gray"] + ["tab:blue"] * len(ranks[0]))
    ax.axhline(single / 2**20 / (p * p), color="tab:green", ls="--", label=f"1 device / P (P={p * p})")
    ax.set_ylabel("peak live tensor memory (MiB)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def demo(args) -> int:
    t0 = time.time()
    p, n = args.mesh, args.tokens
    div = "divisible" if n % p == 0 else "not divisible"
    print(f"autocp demo: {p}x{p} mesh of local CPU processes (gloo), N={n} tokens ({div} by p={p}), "
          f"{args.blocks} block(s), C={args.channels}, 2 masked tokens, random weights", flush=True)
    print(f"[1/5] starting {p * p} CPU process(es) (torch + boltz are imported once, then forked) ...", flush=True)
    from .testing import run_distributed

    res = run_distributed(_demo_rank, p * p, args.model, n, args.blocks, args.channels, args.msa_rows, timeout=900)
    r0 = res[0]
    print(f"[5/5] done in {time.time() - t0:.1f} s (parallelize: {r0['compile_s']:.1f} s)")
    print(f"model: {r0['desc']}")
    for w in r0["warnings"]:
        print(f"autocp warning: {w}")
    gathered = sorted(k or "<whole model>" for k, a in r0["actions"].items() if a != "op")
    print(f"modules run as 2D ops: {sum(a == 'op' for a in r0['actions'].values())}; gathered (fallback): "
          f"{len(gathered)}{' (' + ', '.join(gathered) + ')' if gathered else ''}")
    worst = 0.0
    for i, o in enumerate(r0["outputs"]):
        rel = o["max_abs_err"] / max(o["scale"], 1e-12)
        worst = max(worst, rel)
        print(f"output {i} {tuple(o['shape'])}: max |parallel - single device| = {o['max_abs_err']:.2e} "
              f"(max |output| {o['scale']:.3f}, relative {rel:.1e})")
    ok = worst <= 1e-4
    single = r0["peak_single"]
    peaks = [r["peak_rank"] for r in res]
    print(f"peak memory (forward, live tensors incl. parameters and inputs): single device {single / 2**20:.2f} MiB; "
          f"per rank {', '.join(f'{v / 2**20:.2f}' for v in peaks)} MiB; max rank {max(peaks) / 2**20:.2f} MiB; "
          f"ratio single / max rank = {single / max(peaks):.2f} (ideal P = {p * p})")
    print("\n" + r0["explain"] + "\n")
    if args.png:
        print(_plot_memory(args.png, single, (peaks, [tuple(r["coord"]) for r in res]), p,
                           f"autocp demo: N={n}, {p}x{p} mesh, forward peak per rank"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mesh": p, "tokens": n, "blocks": args.blocks, "channels": args.channels, "model": args.model,
                       "ranks": res, "match": ok, "seconds": time.time() - t0}, f, indent=1, default=str)
    print(f"relative max error {worst:.1e}: {'MATCH' if ok else 'MISMATCH'} ({time.time() - t0:.1f} s)")
    return 0 if ok else 1


# ----------------------------------------------------------------------------- estimate
def _fmt_bytes(b: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{int(b)} B"


def _full_model_peak(args, dtype):
    """``peak(p)`` of the whole Boltz-2 prediction (autocp.models.boltz_estimate) and its description."""
    from .models.boltz_estimate import PredictShape, estimate_boltz, released_boltz2_config

    shape = PredictShape(args.tokens, n_atoms=args.atoms, msa_rows=args.msa_rows or 8192,
                         recycling_steps=args.recycling_steps, sampling_steps=args.sampling_steps,
                         diffusion_samples=args.diffusion_samples, max_parallel_samples=args.max_parallel_samples)
    cfg = released_boltz2_config()
    desc = (f"the whole Boltz-2 prediction (released configuration: {cfg['pairformer_args']['num_blocks']} Pairformer "
            f"blocks, token_s={cfg['token_s']}, token_z={cfg['token_z']}; {shape.atoms():,} atoms, {shape.msa_rows:,} "
            f"MSA rows; {shape.recycling_steps} recycling steps, {shape.sampling_steps} sampling steps, "
            f"{shape.diffusion_samples} sample(s), at most {shape.max_parallel_samples} in parallel)")

    def peak(p):
        e = estimate_boltz(shape=shape, p=p, dtype=dtype, config=cfg)
        if args.table:
            print(e.table("GiB"), flush=True)
        return e.peak_bytes

    return peak, desc


def estimate_cmd(args) -> int:
    import torch

    import autocp

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.max_mesh is None:
        args.max_mesh = 16 if args.model == FULL_MODEL else 64
    if args.model == FULL_MODEL:
        full_peak, desc = _full_model_peak(args, dtype)
        model = None
    else:
        model, make, desc = build_model(args.model, channels=args.channels, blocks=args.blocks,
                                        msa_rows=args.msa_rows or 1024)
    if model is not None:
        model.train(args.train)
    n = args.tokens
    what = "forward+backward (one training step)" if args.train else "forward (inference)"
    low = dtype != torch.float32
    print(f"autocp estimate: {desc}\nN={n:,} tokens, {args.dtype}{' (autocast, pair tensors stored in ' + args.dtype + ')' if low else ''}, "
          f"{what}; FakeTensor runs of the tile program of rank (0,1), nothing allocated", flush=True)
    cap = args.device_memory
    if cap is not None:
        print(f"device memory: {_fmt_bytes(cap)}", flush=True)
    cache = {}

    def peak(p):
        if p not in cache:
            t = time.time()
            if model is None:
                cache[p] = full_peak(p)
            else:
                cache[p] = autocp.estimate(model, n_tokens=n, mesh_shape=(p, p), dtype=dtype, backward=args.train,
                                           make_inputs=lambda k: make(k, meta=True, dtype=dtype),
                                           pair_dtype=dtype if low else None).peak_bytes
            print(f"  ... {p}x{p}: {_fmt_bytes(cache[p])} per rank ({time.time() - t:.1f} s)", flush=True)
        return cache[p]

    for p in args.mesh or ():
        peak(p)
    good = None
    if cap is not None:
        # autocp.estimate plans at an N that is no channel width (passes.pipeline.planning_n):
        # every side is usable
        sides = list(range(1, min(args.max_mesh, n) + 1))
        # the per-rank peak falls with p: walk down from the largest side (cheap: small
        # tiles), halving while it fits, then bisect between the last fitting side and the
        # next smaller one (over the usable sides)
        if sides and peak(sides[-1]) <= cap:
            lo = len(sides) - 1
            while lo > 0 and peak(sides[lo // 2]) <= cap:
                lo //= 2
            good, bad = lo, (lo // 2 if lo > 0 else -1)
            while bad >= 0 and good - bad > 1:
                mid = (good + bad) // 2
                if peak(sides[mid]) <= cap:
                    good = mid
                else:
                    bad = mid
            good = sides[good]
    print(f"\n  {'mesh':>9s}  {'devices':>7s}  {'per-rank peak':>14s}" + ("  fits" if cap is not None else ""))
    for p in sorted(cache):
        fit = "" if cap is None else ("  yes" if cache[p] <= cap else "  no")
        print(f"  {f'{p}x{p}':>9s}  {p * p:7d}  {_fmt_bytes(cache[p]):>14s}{fit}")
    if cap is None:
        return 0
    if good is None:
        hi = min(args.max_mesh, n)
        print(f"no square mesh up to {hi}x{hi} fits {_fmt_bytes(cap)} per device at N={n:,}. "
              f"Fix: a larger --max-mesh, --dtype bf16, or more device memory.")
        return 0
    print(f"smallest square mesh that fits {_fmt_bytes(cap)} per device: {good}x{good} ({good * good} devices), "
          f"per-rank peak {_fmt_bytes(cache[good])}")
    return 0


# ----------------------------------------------------------------------------- explain
def explain_cmd(args) -> int:
    import warnings

    import autocp

    model, make, desc = build_model(args.model, channels=args.channels, blocks=args.blocks)
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        pm = autocp.parallelize(model, autocp.SquareMesh.single(), example_inputs=make(args.tokens),
                                input_layouts=input_layouts(model))
    if args.format == "text":
        text = f"# {desc}\n" + "".join(f"# autocp warning: {w.message}\n" for w in wl) + pm.explain() + "\n"
    elif args.format == "dot":
        text = pm.report.to_dot()
    else:
        path = args.out or "autocp_graph.graphml"
        pm.report.to_graphml(path)
        print(f"wrote {path} ({desc}; {pm.report.n_nodes} captured ATen nodes)")
        return 0
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


# ----------------------------------------------------------------------------- bench
def _bench_rank(rank: int, world: int, what: str, ns: list, blocks: int, channels: int) -> list:
    """Per N: this rank's forward peak (memory) or bytes sent, measured and analytic (comm)."""
    import warnings

    import torch

    import autocp
    from .passes.explain import layer_comm

    mesh = autocp.init_mesh()
    model, make = _bench_pairformer(channels, blocks)
    rows = []
    for n in ns:
        inputs = make(n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = autocp.parallelize(model, mesh, example_inputs=inputs, input_layouts=input_layouts(model))
        with torch.no_grad():
            local = list(pm.to_tiles(*inputs)[0])
            tiles = [x.to_local() if hasattr(x, "to_local") else x for x in local]
            if what == "memory":
                with autocp.MemoryTracker(track=[*model.parameters(), *tiles]) as mt:
                    pm(*local, output="local")
                row = {"n": n, "P": world, "peak_bytes": mt.peak_bytes}
                if world == 1:
                    with autocp.MemoryTracker(track=[*model.parameters(), *inputs]) as mt1:
                        model(*inputs)
                    row["original_peak_bytes"] = mt1.peak_bytes
            else:
                with autocp.comm.count_comm() as st:
                    pm(*local, output="local")
                per_layer = layer_comm(pm.report)
                analytic = sum(v.get(mesh.coord, 0) for v in per_layer.values()) / max(len(per_layer), 1)
                row = {"n": n, "P": world, "measured_bytes_per_layer": st.total_bytes / blocks,
                       "analytic_bytes_per_layer": analytic, "by_primitive": dict(st.bytes)}
        rows.append(row)
    return rows


def _bench_pairformer(channels: int, blocks: int):
    """Boltz-2 PairformerModule (random weights) and its inputs (2 masked tokens)."""
    from boltz.model.layers.pairformer import PairformerModule

    w = _widths(channels)
    model = PairformerModule(w["cs"], w["cz"], blocks, num_heads=w["heads"], dropout=0.0, v2=True,
                             pairwise_head_width=w["pw_width"], pairwise_num_heads=w["pw_heads"])
    randomize_(model, 0)
    model._autocp_cli_inputs = ("s", "z", "mask", "pair_mask")
    return model.eval(), _builtin_inputs("pairformer", w, 0)


def _machine() -> str:
    import platform

    return f"{platform.machine()} CPU, {os.cpu_count()} cores, gloo, torch {__import__('torch').__version__}"


def bench_cmd(args) -> int:
    from .testing import run_distributed

    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    base = os.path.join(args.out, f"bench_{args.what}")
    cfg = {"model": "Boltz-2 PairformerModule", "blocks": args.blocks, "channels": args.channels,
           "widths": _widths(args.channels), "machine": _machine()}
    if args.what in ("memory", "comm"):
        meshes = args.mesh or ((1, 2, 3) if args.what == "memory" else (2, 3))
        ns = sorted(args.tokens or (20, 32, 44))
        rows = []
        for p in meshes:
            print(f"[{args.what}] {p}x{p} mesh ({p * p} CPU processes), N = {ns} ...", flush=True)
            per_rank = run_distributed(_bench_rank, p * p, args.what, ns, args.blocks, args.channels, timeout=900)
            for i, n in enumerate(ns):
                rs = [r[i] for r in per_rank]
                if args.what == "memory":
                    row = {"n": n, "P": p * p, "max_rank_peak_bytes": max(r["peak_bytes"] for r in rs),
                           "rank_peak_bytes": [r["peak_bytes"] for r in rs]}
                    if "original_peak_bytes" in rs[0]:
                        row["original_peak_bytes"] = rs[0]["original_peak_bytes"]
                    print(f"  N={n:4d} P={p * p}: per-rank peak max {row['max_rank_peak_bytes'] / 2**20:8.3f} MiB" +
                          (f" (original module {row['original_peak_bytes'] / 2**20:.3f} MiB)" if "original_peak_bytes" in row else ""))
                else:
                    row = {"n": n, "P": p * p,
                           "measured_bytes_per_layer": max(r["measured_bytes_per_layer"] for r in rs),
                           "analytic_bytes_per_layer": max(r["analytic_bytes_per_layer"] for r in rs),
                           "by_primitive_rank0": rs[0]["by_primitive"]}
                    print(f"  N={n:4d} P={p * p}: bytes sent per layer (busiest rank) measured "
                          f"{row['measured_bytes_per_layer'] / 2**10:9.1f} KiB, analytic "
                          f"{row['analytic_bytes_per_layer'] / 2**10:9.1f} KiB")
                rows.append(row)
    else:
        rows = _bench_speed(args)
    res = {"benchmark": args.what, "config": cfg, "rows": rows, "seconds": time.time() - t0}
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {base}.json")
    print(_plot_bench(args.what, rows, base + ".png", cfg))
    return 0


def _bench_speed(args) -> list:
    import warnings

    import torch

    import autocp

    torch.set_num_threads(1)
    model, make = _bench_pairformer(args.channels, args.blocks)
    rows = []
    for n in sorted(args.tokens or (20, 44, 68)):
        inputs = make(n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = autocp.parallelize(model, autocp.SquareMesh.single(), example_inputs=inputs,
                                input_layouts=input_layouts(model))
        times = {}
        with torch.no_grad():
            for name, fn in (("original", lambda: model(*inputs)), ("parallelize_1x1", lambda: pm(*inputs))):
                fn()  # warm-up
                ts = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t)
                times[name] = min(ts)
        row = {"n": n, "original_s": times["original"], "parallelize_1x1_s": times["parallelize_1x1"],
               "ratio": times["parallelize_1x1"] / times["original"]}
        print(f"  N={n:4d}: original {row['original_s'] * 1e3:8.1f} ms, parallelize 1x1 "
              f"{row['parallelize_1x1_s'] * 1e3:8.1f} ms (x{row['ratio']:.2f}), best of {args.repeat}", flush=True)
        rows.append(row)
    return rows


def _plot_bench(what: str, rows: list, path: str, cfg: dict) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG written (pip install matplotlib)"
    import math

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sub = f"Boltz-2 PairformerModule, {cfg['blocks']} block(s), token_z={cfg['channels']}; {cfg['machine']}"
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    if what == "memory":
        ps = sorted({r["P"] for r in rows})
        ref = max((r for r in rows if r["P"] == ps[0]), key=lambda r: r["n"])
        k = ref["max_rank_peak_bytes"] * ps[0] / ref["n"] ** 2  # bytes per N^2 at P=1, from the smallest mesh
        for i, P in enumerate(ps):
            rs = sorted((r for r in rows if r["P"] == P), key=lambda r: r["n"])
            ns = [r["n"] for r in rs]
            c = colors[i % len(colors)]
            ax.plot(ns, [r["max_rank_peak_bytes"] / 2**20 for r in rs], "o-", color=c, label=f"measured, P={P} (max rank)")
            if P > 1:
                ax.plot(ns, [k * n * n / P / 2**20 for n in ns], "--", color=c, alpha=0.7, label=f"O(N²/P), P={P}")
                ax.plot(ns, [k * n * n / math.sqrt(P) / 2**20 for n in ns], ":", color=c, alpha=0.7,
                        label=f"O(N²/√P), P={P}")
        orig = sorted((r for r in rows if "original_peak_bytes" in r), key=lambda r: r["n"])
        if orig:
            ax.plot([r["n"] for r in orig], [r["original_peak_bytes"] / 2**20 for r in orig], "x-", color="gray",
                    label="original module, 1 process")
        ax.set_xlabel("tokens N")
        ax.set_ylabel("per-rank peak live tensor memory, forward (MiB)")
        ax.set_title("per-rank memory vs N (lines: P=1 measurement scaled)\n" + sub, fontsize=8)
    elif what == "comm":
        ps = sorted({r["P"] for r in rows})
        for i, P in enumerate(ps):
            rs = sorted((r for r in rows if r["P"] == P), key=lambda r: r["n"])
            ns = [r["n"] for r in rs]
            c = colors[i % len(colors)]
            ax.plot(ns, [r["analytic_bytes_per_layer"] / 2**10 for r in rs], "-", color=c, label=f"analytic (ops' formulas), P={P}")
            ax.plot(ns, [r["measured_bytes_per_layer"] / 2**10 for r in rs], "o", color=c, label=f"measured (count_comm), P={P}")
        ax.set_xlabel("tokens N")
        ax.set_ylabel("bytes sent per layer by the busiest rank (KiB)")
        ax.set_title("communication per Pairformer layer, one forward\n" + sub, fontsize=8)
    else:
        ns = [r["n"] for r in rows]
        ax.plot(ns, [r["original_s"] * 1e3 for r in rows], "o-", label="original module (1 process)")
        ax.plot(ns, [r["parallelize_1x1_s"] * 1e3 for r in rows], "s-", label="autocp.parallelize, 1x1 mesh")
        ax.set_xlabel("tokens N")
        ax.set_ylabel("forward time, best of runs (ms)")
        ax.set_title("overhead of the compiled module on one device\n" + sub, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    prog = f"autocp {args.cmd}"
    try:
        _check(args)
        if args.cmd == "demo":
            return demo(args)
        if args.cmd == "predict":
            return predict_cmd(args)
        if args.cmd == "estimate":
            return estimate_cmd(args)
        if args.cmd == "explain":
            return explain_cmd(args)
        if args.cmd == "bench":
            return bench_cmd(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 -- autocp's own errors (capture, mesh, layout) carry their fix
        if not type(e).__module__.startswith("autocp"):
            raise
        print(f"{prog}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
