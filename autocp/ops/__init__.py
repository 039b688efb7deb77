"""Distributed 2D ops on Pair2D tiles (explicit-backward autograd Functions)."""

__all__: list[str] = []
