"""The ``autocp bench`` benchmarks (memory, comm, speed) in one go, at their small default
sizes: JSON + PNG to ``benchmarks/results/bench_{memory,comm,speed}.{json,png}``.

    python benchmarks/bench_cli.py                  # all three (about a minute on 2 CPU cores)
    python benchmarks/bench_cli.py memory --tokens 32 64 96

* memory: per-rank forward peak (autocp.MemoryTracker) of a Boltz-2 PairformerModule through
  ``autocp.parallelize`` vs N, on 1x1, 2x2 and 3x3 gloo meshes, with O(N^2/P) and
  O(N^2/sqrt(P)) reference lines (the 1x1 measurement scaled) and the original module;
* comm: bytes sent per Pairformer layer by the busiest rank, measured by
  ``autocp.comm.count_comm()`` vs the ops' analytic volume (explain's per-op formulas);
* speed: forward time of ``parallelize`` on a 1x1 mesh vs the original module (one process).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autocp.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    out = ["--out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")]
    if args and args[0] in ("memory", "comm", "speed"):
        sys.exit(main(["bench", *args, *([] if "--out" in args else out)]))
    for what in ("memory", "comm", "speed"):
        rc = main(["bench", what, *args, *out])
        if rc:
            sys.exit(rc)
