"""One base class for the modules that stand in for a user module.

:class:`GatherFallback` (runs a module gathered) and
:class:`~autocp.passes.emit.ParallelModule` (the whole parallel model) both *adopt* the wrapped module's state and *hold* the module:

* its children, direct parameters and buffers are registered on the wrapper under the
  same names (shared objects), so ``state_dict`` keys, ``parameters()`` and optimizers
  see exactly the original's tensors;
* the module itself is kept as ``self.inner`` without being registered (no second
  prefix in the ``state_dict``);
* ``train()`` / ``eval()`` are mirrored onto ``inner``.
"""

from __future__ import annotations

from torch import nn

from ..ops.common import adopt_module_state

__all__ = ["ModuleWrapper"]


class ModuleWrapper(nn.Module):
    """Adopts ``inner``'s state (same objects, same keys) and holds ``inner``; see the module doc."""

    def __init__(self, inner: nn.Module, mesh, path: str = ""):
        super().__init__()
        adopt_module_state(self, inner)
        object.__setattr__(self, "inner", inner)
        self.mesh = mesh
        self.path = path
        self.training = inner.training

    def train(self, mode: bool = True):
        super().train(mode)
        self.inner.train(mode)
        return self
