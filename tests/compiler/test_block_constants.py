"""Repeated blocks are captured once and replayed with each instance's parameters -- so any
other per-instance state the captured graph bakes in must make the instances different
groups. Found on MSA-Pairformer (``outer_product.py``): each layer stores
``self.lambda_init = torch.tensor(0.8 - 0.6 * exp(-0.3 * layer_idx))``, a plain tensor
attribute (no parameter, no buffer) that ``torch.export`` lifts as a constant of the
representative's graph; every later layer then ran with layer 0's value -- a wrong output
without an error (4.6e-3 relative at the second layer, gradients 3%)."""

import warnings

import pytest
import torch
from torch import nn

from autocp.testing import run_distributed


class Layer(nn.Module):
    def __init__(self, i: int):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.lam = torch.tensor(0.8 - 0.6 * float(torch.exp(torch.tensor(-0.3 * i))))  # not a buffer

    def forward(self, z):
        return z + self.lin(z) * self.lam


class Stack(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.layers = nn.ModuleList([Layer(i) for i in range(depth)])

    def forward(self, z):
        for layer in self.layers:
            z = layer(z)
        return z


def test_tensor_attributes_split_block_groups():
    from autocp.passes.trace import find_repeated_blocks

    same = Stack()
    for layer in same.layers:
        layer.lam = torch.tensor(0.5)
    assert list(find_repeated_blocks(same, {}).values()) == [["layers.0", "layers.1", "layers.2"]]
    groups = find_repeated_blocks(Stack(), {})
    assert not any(len(v) > 1 for v in groups.values()), groups  # three different constants


def block_worker(rank, world):
    import autocp

    mesh = autocp.init_mesh()
    torch.manual_seed(0)
    model = Stack()
    z = torch.randn(1, 7, 7, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = autocp.parallelize(model, mesh, example_inputs=(z,))
        out = pm(z)
    ref = model(z)
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 4])
def test_per_instance_constants_are_used(world):
    for err in run_distributed(block_worker, world):
        assert err < 1e-6, err
