"""The compile passes (autocp.passes.infra): contracts run around every pass when checking is
on (the test suite sets AUTOCP_CHECK_PASSES=1), a broken invariant fails at the pass that
broke it -- as a PassCheckError, which a model's ``except Exception`` cannot swallow."""

import pytest
import torch
from torch import nn

from autocp.passes.infra import CAPTURE, CLAIM, CompileState, PassBase, PassCheckError, PassManager, checking


class Claimed(nn.Module):
    """A module registered without a 2D op: captured opaque, claimed as "fallback"."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, z):
        return self.lin(z)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Claimed()

    def forward(self, z):
        return self.inner(z) + z.transpose(1, 2)


def _state():
    import autocp

    z = torch.randn(1, 6, 6, 4)
    return CompileState(Tiny(), (z,), {}, [(None, "r", "c", None)], 6, autocp.init_mesh())


def test_suite_checks_contracts():
    assert checking()  # tests/conftest.py turns the contracts on for every compile in the suite


def test_pipeline_runs_every_pass_in_order():
    import autocp

    autocp.register_module(Claimed, None, kind="test_claimed")
    st = PassManager([CAPTURE, CLAIM], check=True)(_state())
    assert st.log == ["capture", "claim"]
    assert st.plan.actions["inner"].action == "fallback"


def test_requires_names_the_missing_input():
    with pytest.raises(PassCheckError, match="'claim' requires: no capture"):
        PassManager([CLAIM], check=True)(_state())


def test_a_pass_that_breaks_the_plan_fails_at_its_ensures():
    import autocp

    autocp.register_module(Claimed, None, kind="test_claimed")

    class Corrupt(PassBase):
        """A buggy claim pass: it loses the action of a registered module."""

        name = "claim"

        def call(self, state):
            CLAIM.call(state)
            state.plan.actions.pop("inner")

        ensures = CLAIM.ensures

    with pytest.raises(PassCheckError, match="'claim' ensures: opaque module inner has no plan action"):
        PassManager([CAPTURE, Corrupt()], check=True)(_state())
    # unchecked, the same bug passes silently: the contract is what catches it
    st = PassManager([CAPTURE, Corrupt()], check=False)(_state())
    assert "inner" not in st.plan.actions


def test_pass_check_error_is_not_an_exception():
    assert not issubclass(PassCheckError, Exception) and issubclass(PassCheckError, BaseException)
