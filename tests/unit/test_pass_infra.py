"""The compile passes (autocp.passes.infra): contracts run around every pass when checking is
on (the test suite sets AUTOCP_CHECK_PASSES=1), a broken invariant fails at the pass that
broke it -- as a PassCheckError, which a model's ``except Exception`` cannot swallow."""

import pytest
import torch
from torch import nn

from autocp.passes.infra import (ANALYZE, CAPTURE, MATCH, PLAN, CompileState, PassBase, PassCheckError, PassManager,
                                 checking)
from autocp.passes.record import put, rec


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, z):
        return self.lin(z) + z.transpose(1, 2)


def _state():
    import autocp

    z = torch.randn(1, 6, 6, 4)
    return CompileState(Tiny(), (z,), {}, [(None, "r", "c", None)], 6, autocp.init_mesh())


def test_suite_checks_contracts():
    assert checking()  # tests/conftest.py turns the contracts on for every compile in the suite


def test_pipeline_runs_every_pass_in_order():
    st = PassManager([CAPTURE, ANALYZE, MATCH, PLAN], check=True)(_state())
    assert st.log == ["capture", "analyze", "match", "plan"]
    assert st.capture is not None and st.analysis is not None and st.matches is not None and st.plan is not None


def test_requires_names_the_missing_input():
    with pytest.raises(PassCheckError, match="'analyze' requires: no capture"):
        PassManager([ANALYZE], check=True)(_state())


def test_a_pass_that_breaks_the_records_fails_at_its_ensures():
    class Corrupt(PassBase):
        """A buggy analysis: one layout with the wrong number of dims."""

        name = "analyze"

        def call(self, state):
            ANALYZE.call(state)
            nd = next(n for n in state.capture.top.graph.nodes if n.op == "call_function"
                      and isinstance(n.meta.get("val"), torch.Tensor))
            put(nd, layout=(None, "r"))

        ensures = ANALYZE.ensures

    with pytest.raises(PassCheckError, match="'analyze' ensures: node .* has layout \\(None, 'r'\\) for a 4-dim"):
        PassManager([CAPTURE, Corrupt()], check=True)(_state())
    # unchecked, the same bug passes silently: the contract is what catches it
    st = PassManager([CAPTURE, Corrupt()], check=False)(_state())
    assert any(rec(n).layout == (None, "r") for n in st.capture.top.graph.nodes)


def test_pass_check_error_is_not_an_exception():
    assert not issubclass(PassCheckError, Exception) and issubclass(PassCheckError, BaseException)
