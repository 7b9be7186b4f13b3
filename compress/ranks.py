"""Sharing the per-layer work of a data-parallel quantization (docs/scale.md, "Data-parallel").

Once a group's statistics are all-reduced (:meth:`.obs.OBSQuantizer.all_reduce`), every layer of
the group is fitted and solved by one rank, its owner, and the result is broadcast to the others.
A group's layers go round-robin to the ranks ordered by the work they were given so far (least
first; the work of a layer estimated as ``N K^2 + K^3`` for ``N`` rows and ``K`` columns: its OBS
sweep, fit and factorizations), so q/k/v or gate/up are solved side by side and the single-layer
groups (attention output, down projection) go to the least loaded rank. The owner computes exactly
what one process computes for that layer, so the output does not depend on the number of ranks
beyond the statistics' reduction order.
"""
from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from .calib import to_device
from .layer import geometry
from .obs import QuantResult


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` under an initialized ``torch.distributed`` process group, else ``(0, 1)``."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Owners:
    """The rank that quantizes each layer (the same on every rank: it depends on shapes only)."""

    def __init__(self) -> None:
        self.rank, self.world = rank_world()
        self.load = [0] * self.world  # estimated work given to each rank so far
        self.here: list[str] = []  # the layers this rank quantized

    def place(self, names: list[str], layers: list[nn.Module]) -> list[int]:
        """The owner of each layer of a group (``names``, ``layers``); records this rank's."""
        by_load = sorted(range(self.world), key=lambda r: (self.load[r], r))
        owners = [by_load[i % self.world] for i in range(len(names))]
        for name, layer, owner in zip(names, layers, owners):
            geo = geometry(layer, name)
            self.load[owner] += geo.out_features * geo.k ** 2 + geo.k ** 3
        self.here += [n for n, o in zip(names, owners) if o == self.rank]
        return owners

    def share(self, results: dict[int, QuantResult], owners: list[int]) -> list[QuantResult]:
        """Every layer's result, in order: this rank's own from ``results`` (index -> result), the
        others received from their owners (one ``broadcast_object_list`` per layer, the tensors on
        CPU; receivers move them where they are used)."""
        if self.world == 1:
            return [results[i] for i in range(len(owners))]
        import torch.distributed as dist
        out = []
        for i, owner in enumerate(owners):
            mine = results.get(i)
            box = [None if mine is None else {f.name: to_device(getattr(mine, f.name), torch.device("cpu"))
                                              for f in fields(mine)}]
            dist.broadcast_object_list(box, src=owner)
            got = box[0]
            if got is None:
                raise RuntimeError(f"rank {owner} sent no result for layer {i} of the group")
            out.append(mine if mine is not None else QuantResult(**got))
        return out


__all__ = ["Owners", "rank_world"]
