"""autocp.parallelize on the external AF3-like corpus (tests/corpus/): one table.

    bash scripts/install_corpus.sh                 # once: the pinned corpus, --no-deps
    python benchmarks/corpus_report.py             # 2x2 and 3x3, memory at N=96 on 2x2
    python benchmarks/corpus_report.py --quick     # 2x2 only, memory at N=32

Per case (a codebase's own stack called as its top-level model calls it, and the same
stack behind a ``forward(s, z, mask)`` wrapper) and mesh: outcome (``ok``, ``MISMATCH``
with the errors, or the first line of the error and the phase it happened in), the max
output error relative to scale, the max parameter gradient error relative to scale (after
``sync_grads`` unless the module reduces its own gradients), the number of warnings that
say "gathered", the K of "K glue op(s) gather a pair tensor" and the "N gathered" count of
``pm.explain()`` (modules run gathered); per case, the per-rank
peak memory (``autocp.MemoryTracker``, no-grad forward on this rank's tiles, parameters
included) against the single device at N=96 on 2x2, per case. JSON to ``--out``.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from autocp.testing import DistributedTestError, run_distributed  # noqa: E402
from tests.corpus._workers import CASES, TOL, harness, memory_worker, parity_worker  # noqa: E402

MiB = 2.0 ** 20


def first_line(e: BaseException) -> str:
    """The failing rank's own message, '[phase] Type: message' (its first line)."""
    text = str(e)
    for line in text.splitlines():
        if line.startswith("tests.corpus._workers.CorpusFailure: "):
            return line.split("CorpusFailure: ", 1)[1].strip()[:240]
    for line in text.splitlines():
        if "CorpusFailure: [" in line:
            return line.split("CorpusFailure: ", 1)[1].strip()[:240]
    return (text.splitlines()[0] if text else type(e).__name__)[:240]


def parity_row(case, world, timeout):
    p = int(round(world ** 0.5))
    row = {"case": case, "mesh": f"{p}x{p}"}
    t0 = time.time()
    try:
        res = run_distributed(parity_worker, world, case, timeout=timeout)
    except DistributedTestError as e:
        row.update(outcome=first_line(e), seconds=round(time.time() - t0, 1))
        return row
    except Exception as e:  # noqa: BLE001
        row.update(outcome=f"{type(e).__name__}: {e}".splitlines()[0][:240], seconds=round(time.time() - t0, 1))
        return row
    out_err = max(max(r["out_rel_err"]) for r in res)
    grad_err = max(r["grad_rel_err"] for r in res)
    missing = sorted({k for r in res for k in r["missing_grads"]})
    vacuous = [w for w, bad in (("output does not depend on input", res[0]["input_sensitivity"] <= 1e-3),
                                ("zero reference gradients", res[0]["max_ref_grad"] <= 0),
                                ("identity reference", (res[0]["moved"] or 1.0) <= 1e-2)) if bad]
    ok = out_err <= TOL and grad_err <= TOL and not missing and not vacuous
    outcome = "ok" if ok else "MISMATCH" + "".join(
        f" {x}" for x in ([f"out {out_err:.2g}"] if out_err > TOL else []) + ([f"grad {grad_err:.2g}"] if grad_err > TOL else [])
        + ([f"{len(missing)} params without grad"] if missing else []) + vacuous)
    r0 = res[0]
    row.update(outcome=outcome, out_rel_err=out_err, grad_rel_err=grad_err,
               worst_grad=r0["worst_grads"][0][0] if r0["worst_grads"] else None,
               gathered_warnings=max(r["n_gathered_warnings"] for r in res),
               gathered_glue_ops=max(r["gathered_glue_ops"] for r in res),
               explain_gathered=r0["explain_gathered"], explain_summary=r0["explain_summary"],
               auto_grad_sync=r0["auto_grad_sync"], compile_s=round(r0["compile_s"], 2),
               warnings=r0["warnings"][:6], seconds=round(time.time() - t0, 1))
    return row


def memory_row(case, world, n, timeout):
    p = int(round(world ** 0.5))
    row = {"case": case, "mesh": f"{p}x{p}", "n": n}
    try:
        res = run_distributed(memory_worker, world, case, n=n, timeout=timeout)
    except DistributedTestError as e:
        row["memory"] = first_line(e)
        return row
    single = res[0]["peak_single"]
    ranks = [r["peak_rank"] for r in res]
    row.update(memory="ok", single_MiB=round(single / MiB, 2), rank_MiB=[round(x / MiB, 2) for x in ranks],
               ratio_single_over_max_rank=round(single / max(ranks), 2), ideal=world)
    return row


def fmt(x, spec=".1e"):
    return "-" if x is None else (format(x, spec) if isinstance(x, float) else str(x))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2x2 only; memory at N=32")
    ap.add_argument("--meshes", type=int, nargs="+", default=None, help="mesh sides (default 2 3)")
    ap.add_argument("--cases", nargs="+", default=None, help=f"default: all of {list(CASES)}")
    ap.add_argument("--mem-n", type=int, default=None, help="tokens of the memory run (default 96; 32 with --quick)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0, help="per distributed run, seconds")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "corpus_report.json"))
    a = ap.parse_args(argv)
    meshes = a.meshes or ([2] if a.quick else [2, 3])
    mem_n = a.mem_n or (32 if a.quick else 96)
    cases, skipped = [], []
    for c in a.cases or CASES:
        why = harness(c.partition(":")[0]).unavailable()
        (skipped.append({"case": c, "outcome": f"skipped: {why}"}) if why else cases.append(c))
    rows = list(skipped)
    for p in meshes:
        for c in cases:
            r = parity_row(c, p * p, a.timeout)
            rows.append(r)
            print(f"{r['case']:<28} {r['mesh']:<4} {r['outcome'][:110]}", flush=True)
    mem = []
    if not a.no_memory:
        for c in cases:
            m = memory_row(c, 4, mem_n, a.timeout)
            mem.append(m)
            print(f"memory {c:<28} N={mem_n} 2x2: {m.get('memory')[:100]} single {m.get('single_MiB')} MiB, "
                  f"ranks {m.get('rank_MiB')} MiB", flush=True)
    print()
    hdr = ("| case | mesh | outcome | max rel out err | max rel grad err | 'gathered' warnings | "
           "glue ops gathered | explain: modules gathered |")
    print(hdr)
    print("|" + "---|" * 8)
    for r in rows:
        print(f"| {r['case']} | {r.get('mesh', '-')} | {r['outcome'][:160]} | {fmt(r.get('out_rel_err'))} | "
              f"{fmt(r.get('grad_rel_err'))} | {fmt(r.get('gathered_warnings'))} | {fmt(r.get('gathered_glue_ops'))} | "
              f"{fmt(r.get('explain_gathered'))} |")
    if mem:
        print(f"\n| memory (N={mem_n}, 2x2) | outcome | single device MiB | per rank MiB | single / max rank (ideal 4) |")
        print("|---|---|---|---|---|")
        for m in mem:
            print(f"| {m['case']} | {m['memory'][:160]} | {fmt(m.get('single_MiB'), '.2f')} | {fmt(m.get('rank_MiB'))} | "
                  f"{fmt(m.get('ratio_single_over_max_rank'), '.2f')} |")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"tolerance": TOL, "meshes": meshes, "rows": rows, "memory": mem}, f, indent=1, default=str)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
