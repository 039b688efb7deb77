"""autocp.estimate (fake-tensor simulation, no devices) against the measured per-rank peak
(MemoryTracker on gloo ranks running the parallelized model) at 3 (N, P) points."""

import pytest

from autocp.api import estimate
from autocp.testing import run_distributed
from tests.compiler._workers import build_pairformer, memory_worker

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("n,world", [(40, 1), (40, 4), (45, 9)])
def test_estimate_within_15_percent_of_measured(n, world):
    model = build_pairformer(2, blocks=2, cs=16, cz=16).eval()
    p = int(world ** 0.5)
    est = estimate(model, n_tokens=n, mesh_shape=(p, p))
    measured = max(run_distributed(memory_worker, world, n, timeout=300))
    ratio = est.peak_bytes / measured
    print(f"N={n} P={world}: estimate {est.peak_bytes} B, measured {measured} B, ratio {ratio:.3f}")
    assert 0.85 <= ratio <= 1.15, (n, world, est.peak_bytes, measured)
