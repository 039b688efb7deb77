"""MemoryTracker measures live tensor bytes exactly (CPU dispatch tracker)."""

from __future__ import annotations

import gc

import pytest
import torch

from autocp.memory import MemoryTracker, peak_memory


def test_known_allocation_exact():
    with MemoryTracker() as mt:
        a = torch.empty(1000, dtype=torch.float32)
        assert mt.live_bytes == 4000 and mt.peak_bytes == 4000
        b = torch.empty(1000, dtype=torch.bfloat16)
        c = torch.zeros(10, 10, dtype=torch.float64)
        assert mt.live_bytes == 4000 + 2000 + 800
        del a, b, c
    assert mt.live_bytes == 0
    assert mt.peak_bytes == 6800
    assert mt.peak_mb == pytest.approx(6800 / 2**20)


def test_views_and_inplace_are_free():
    with MemoryTracker() as mt:
        a = torch.zeros(20, 50)
        base = mt.live_bytes
        assert base == 4000
        views = [a.view(1000), a.t(), a[3:7], a[:, ::2], a.detach(), a.unsqueeze(0).expand(4, 20, 50),
                 a.reshape(50, 20), a.narrow(1, 0, 3), *a.split(5)]
        a.add_(1.0).mul_(2.0)
        a[0].zero_()
        assert mt.live_bytes == base and mt.peak_bytes == base, "views / in-place ops were counted"
        # but a reshape that must copy is a new allocation
        s = a.t().reshape(1000)
        assert mt.live_bytes == base + 4000
        del views, s
    assert mt.peak_bytes == 8000


def test_freed_tensors_decrease_live_bytes_and_peak_stays():
    with MemoryTracker() as mt:
        xs = [torch.ones(250) for _ in range(4)]  # 4 x 1000 bytes
        assert mt.live_bytes == 4000
        xs.pop()
        assert mt.live_bytes == 3000
        xs.clear()
        assert mt.live_bytes == 0
        y = torch.ones(100)  # 400 bytes, after the peak
        assert mt.live_bytes == 400
    assert mt.peak_bytes == 4000
    del y


def test_multiple_outputs_counted():
    x = torch.randn(10, 7)
    with MemoryTracker() as mt:
        values, idx = x.max(dim=1)  # float32 [10] + int64 [10]
        assert mt.live_bytes == 10 * 4 + 10 * 8
    del values, idx


def test_pre_existing_tensors_only_when_tracked():
    params = torch.empty(500)  # 2000 bytes
    other = torch.empty(1000)  # 4000 bytes, not tracked
    with MemoryTracker(track=[params]) as mt:
        assert mt.live_bytes == 2000
        v = params.view(20, 25)  # a view of a tracked tensor: free
        other + 0  # noqa: B018 -- a temporary, freed at once
        assert mt.live_bytes == 2000
        mt.track(other, other[:10])  # explicit, counted once
        assert mt.live_bytes == 6000
        del params, v  # the tracker keeps no reference: freeing it is seen
        gc.collect()
        assert mt.live_bytes == 4000
    assert mt.peak_bytes == 6000
    del other


def test_linear_forward_backward_exact_and_live_returns():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    tracked = [*lin.parameters(), x]
    base = sum(t.numel() * t.element_size() for t in tracked)
    with MemoryTracker(track=tracked) as mt:
        assert mt.live_bytes == base
        y = lin(x).sum()
        fwd_peak = mt.peak_bytes
        # forward: the [3, 4] output (+ the scalar loss), nothing else survives
        assert fwd_peak == base + 3 * 4 * 4 + 4
        assert mt.live_bytes == base + 4
        y.backward()
        # live after backward: base + loss + one gradient per tracked tensor
        assert mt.live_bytes == base + 4 + base
        assert mt.peak_bytes > fwd_peak, "backward-pass allocations were not seen"
        del y
        lin.weight.grad = lin.bias.grad = x.grad = None
        assert mt.live_bytes == base, "live bytes did not return to the baseline"


class _AllocInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        tmp = torch.empty(25_000)  # 100,000 bytes, only inside backward
        tmp.fill_(1.0)
        out = g * tmp[: g.numel()].view_as(g)
        del tmp
        return out


def test_sees_backward_only_allocations():
    x = torch.zeros(10, requires_grad=True)
    with MemoryTracker(track=[x]) as mt:
        y = _AllocInBackward.apply(x)
        loss = y.sum()
        before = mt.peak_bytes
        loss.backward()
        extra = mt.peak_bytes - before
        assert 100_000 <= extra < 100_000 + 1000, f"backward peak grew by {extra} bytes"
        del y, loss


def test_exit_stops_tracking():
    with MemoryTracker() as mt:
        a = torch.empty(100)
    live, peak = mt.live_bytes, mt.peak_bytes
    b = torch.empty(10_000)
    del a
    gc.collect()
    assert (mt.live_bytes, mt.peak_bytes) == (live, peak) == (400, 400)
    del b


def test_nested_trackers_both_count():
    with MemoryTracker() as outer:
        a = torch.empty(100)
        with MemoryTracker() as inner:
            b = torch.empty(200)
        assert inner.peak_bytes == 800
        assert outer.live_bytes == 1200
        del a, b
    assert outer.peak_bytes == 1200


def test_peak_memory_helper():
    x = torch.ones(100)
    res, peak = peak_memory(lambda t: (t * 2).sum(), x, track=[x])
    assert float(res) == 200.0
    assert peak == 400 + 400 + 4  # x, the product, the scalar
