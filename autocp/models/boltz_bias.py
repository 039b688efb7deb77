"""Boltz-2's diffusion token-transformer bias, recomputed per layer instead of kept resident.

Boltz-2's ``DiffusionConditioning`` projects the conditioned pair tensor once per fold,
``token_trans_bias = cat([LayerNorm_l + Linear_l](z) for l in layers], -1)``, and the
score model's ``DiffusionTransformer`` reads layer ``l``'s slice at every sampling step.
The bias ``[B, N, N, depth * heads]`` (384 channels in the released model: 3x ``token_z``)
stays live for the whole sampling loop. Here each projection module is bound to
:class:`LazyBiasProj`: it returns a :class:`LazyPairBias` that holds only the conditioned
``z`` tile (``token_z`` channels, one reference, no copy) and the projection modules; the
``torch.cat``, ``.float()`` and ``view(B, N, N, L, heads)`` Boltz applies are recorded, and
``bias[:, :, :, l]`` runs layer ``l``'s own ``LayerNorm + Linear`` on the z tile (through the
eager 2D layer, tile-local) when the layer needs it; the result is freed after the layer.

Memory: one z tile (``token_z`` channels) resident instead of ``depth * heads`` channels;
cost: one ``LayerNorm + Linear`` of the z tile per layer per sampling step. Any other use of
the bias materialises the whole concatenation (exact, the same values) -- nothing is
approximated. ``mode="auto"`` (the default) makes the bias lazy only when it saves memory
(``depth * heads > token_z``): the real Boltz-2 (384 > 128), not the tiny test widths.
"""

from __future__ import annotations

import torch
from torch import nn

from ..passes.wrapper import ModuleWrapper

__all__ = ["LazyBiasProj", "LazyPairBias", "bind_lazy_bias", "find_bias_projections", "BIAS_MODES"]

BIAS_MODES = ("auto", "lazy", "resident")

_META = {
    torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.ndimension, torch.Tensor.__len__,
    torch.Tensor.is_floating_point, torch.Tensor.element_size, torch.Tensor.nelement, torch.Tensor.get_device,
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.ndim.__get__,
    torch.Tensor.is_cuda.__get__, torch.Tensor.layout.__get__, torch.Tensor.is_sparse.__get__,
    torch.Tensor.is_quantized.__get__, torch.Tensor.is_meta.__get__, torch.Tensor.requires_grad.__get__,
    torch.Tensor.__hash__,
}
STATS = {"built": 0, "layer_reads": 0, "materialised": 0}


class LazyPairBias(torch.Tensor):
    """A deferred ``cat([proj_l(z) for l], -1)`` (optionally viewed as ``[B, N, N, L, h]``).

    ``shape`` is the global shape Boltz sees; nothing of size ``N^2 * depth * heads``
    exists until :meth:`layer` (one slice) or :meth:`materialise` (all) is called."""

    @staticmethod
    def __new__(cls, parts, shape, split: bool = False, cast=None):
        z = parts[0][1]
        r = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=cast or z.dtype, device=z.device,
                                                requires_grad=False)
        r._parts = list(parts)
        r._split = split
        r._cast = cast  # a recorded ``.float()`` / ``.to(dtype)``: applied to each layer's slice
        return r

    def layer(self, i: int):
        """Layer ``i``'s bias ``[B, N, N, h]``: its own projection of the z tile, now."""
        STATS["layer_reads"] += 1
        proj, z = self._parts[i]
        out = proj(z)
        return out.to(self._cast) if self._cast is not None else out

    def materialise(self):
        """The whole bias (exact): every projection, concatenated as Boltz does."""
        STATS["materialised"] += 1
        with torch._C.DisableTorchFunctionSubclass():
            shape = tuple(self.shape)
        out = torch.cat([proj(z) for proj, z in self._parts], dim=-1)
        out = out.to(self._cast) if self._cast is not None else out
        return out.view(shape) if self._split else out

    def __repr__(self):
        with torch._C.DisableTorchFunctionSubclass():
            return f"LazyPairBias(shape={tuple(self.shape)}, layers={len(self._parts)}, split={self._split})"

    __str__ = __repr__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _META:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        handled = _lazy_rule(func, args, kwargs)
        if handled is not NotImplemented:
            return handled
        args, kwargs = torch.utils._pytree.tree_map(
            lambda a: a.materialise() if isinstance(a, LazyPairBias) else a, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"autocp LazyPairBias: {func} reached the dispatcher (a call that bypassed "
                           f"__torch_function__). Fix: call it through torch / Tensor methods, or construct "
                           f"autocp.parallelize(..., token_bias='resident').")


def _dims(x):
    with torch._C.DisableTorchFunctionSubclass():
        return tuple(x.shape)


def _lazy_rule(func, args, kwargs):
    """The few calls Boltz makes on the bias, kept lazy; ``NotImplemented`` for the rest."""
    if func is torch.cat:
        seq = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if (isinstance(seq, (list, tuple)) and seq and all(isinstance(t, LazyPairBias) and not t._split for t in seq)
                and dim in (-1, len(_dims(seq[0])) - 1)
                and all(_dims(t)[:-1] == _dims(seq[0])[:-1] for t in seq)):
            parts = [p for t in seq for p in t._parts]
            shape = _dims(seq[0])[:-1] + (sum(_dims(t)[-1] for t in seq),)
            casts = {t._cast for t in seq}
            if len(casts) != 1:
                return NotImplemented
            return LazyPairBias(parts, shape, cast=casts.pop())
        return NotImplemented
    self = args[0] if args else None
    if not isinstance(self, LazyPairBias):
        return NotImplemented
    if func is torch.Tensor.contiguous and len(args) == 1 and not kwargs:
        return self
    if func is torch.Tensor.float and len(args) == 1 and not kwargs:
        # under bf16 autocast the projections are bf16: Boltz's ``.float()`` is applied per layer slice
        return LazyPairBias(self._parts, _dims(self), split=self._split, cast=torch.float32)
    if func is torch.Tensor.view and not self._split:
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
        shape, cur = tuple(int(s) for s in shape), _dims(self)
        # Boltz: bias.view(B, N, M, L, D // L) with L the number of layers, each of D // L channels
        if (len(shape) == len(cur) + 1 and shape[:-2] == cur[:-1] and shape[-2] == len(self._parts)
                and shape[-2] * shape[-1] == cur[-1]):
            return LazyPairBias(self._parts, shape, split=True, cast=self._cast)
        return NotImplemented
    if func is torch.Tensor.__getitem__ and self._split:
        idx = args[1]
        nd = len(_dims(self))
        if (isinstance(idx, tuple) and len(idx) == nd - 1 and isinstance(idx[-1], int)
                and all(isinstance(s, slice) and s == slice(None) for s in idx[:-1])):
            return self.layer(idx[-1] % len(self._parts))
        return NotImplemented
    return NotImplemented


class LazyBiasProj(ModuleWrapper):
    """One ``token_trans_proj_z[l]`` (``LayerNorm + Linear``), same parameters and keys:
    on a pair tile it returns a :class:`LazyPairBias` (the projection runs when its layer
    reads it); on anything else it runs the module."""

    def forward(self, z):
        from ..passes.eager import TileTensor

        if isinstance(z, TileTensor) and z.dim() == 4 and z.tags[1:3] == ("r", "c"):
            STATS["built"] += 1
            with torch._C.DisableTorchFunctionSubclass():
                shape = tuple(z.shape[:-1]) + (int(self.inner[-1].out_features),)
            return LazyPairBias([(self.inner, z)], shape)
        return self.inner(z)


def find_bias_projections(model: nn.Module) -> dict:
    """``{path: module}`` of every Boltz-2 ``DiffusionConditioning.token_trans_proj_z[l]``."""
    out = {}
    for path, m in model.named_modules():
        if type(m).__name__ == "DiffusionConditioning" and isinstance(getattr(m, "token_trans_proj_z", None),
                                                                      nn.ModuleList):
            for i, proj in enumerate(m.token_trans_proj_z):
                out[f"{path}.token_trans_proj_z.{i}" if path else f"token_trans_proj_z.{i}"] = proj
    return out


def bind_lazy_bias(model: nn.Module, mesh, mode: str = "auto") -> dict:
    """``{path: LazyBiasProj}`` for :func:`autocp.passes.trace.structural_clone` (empty when
    ``mode`` is ``"resident"``, or ``"auto"`` and laziness saves nothing: the held z tile has
    ``token_z`` channels, the resident bias ``depth * heads``)."""
    if mode not in BIAS_MODES:
        raise ValueError(f"autocp Boltz: token_bias={mode!r}; required one of {BIAS_MODES}. Fix: 'auto' keeps "
                         f"the bias lazy when depth * heads > token_z, 'lazy' always, 'resident' never.")
    projs = find_bias_projections(model)
    if mode == "resident" or not projs:
        return {}
    if mode == "auto":
        heads = sum(int(p[-1].out_features) for p in projs.values())
        token_z = int(next(iter(projs.values()))[-1].in_features)
        if heads <= token_z:
            return {}
    return {path: LazyBiasProj(p, mesh) for path, p in projs.items()}
