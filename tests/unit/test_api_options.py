"""Every ``parallelize`` option means the same for blocks and whole models, or raises:
a whole-model driver refuses the options it cannot apply (given / required / fix)."""

import pytest
import torch
from torch import nn

import autocp
from autocp.registry import register_model


class WholeToy(nn.Module):
    def forward(self, feats):
        return feats


def toy_driver(model, mesh, strict=False):
    return model


def test_whole_model_driver_refuses_options_it_cannot_apply():
    register_model(f"{__name__}.WholeToy", f"{__name__}:toy_driver")
    m = WholeToy()
    assert autocp.parallelize(m, None) is m  # the driver's own options only
    for kw in (dict(example_inputs=(torch.zeros(1, 4, 4),)), dict(pair_dtype=torch.bfloat16),
               dict(recompute="blocks"), dict(check_inputs="hash"), dict(emit="eager")):
        with pytest.raises(TypeError) as ei:
            autocp.parallelize(m, None, **kw)
        msg = str(ei.value)
        assert next(iter(kw)) in msg and "do not apply" in msg and "Fix" in msg, msg
