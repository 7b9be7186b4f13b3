"""Calibrating the layers after a chain of blocks (a pooler, a classifier head) from the last
block's stored outputs, without running the blocks again: while such a layer is calibrated, every
block of the chain is replaced by a stand-in that returns the last block's output for the model
call in progress.

This is only valid when the layers after the chain see nothing but the last block's output (not,
say, an earlier stage's features, as an FPN head would); :func:`tail_replayable` checks that on
the first calibration sample (:meth:`.calib.Calibration.run_first`), exactly, before it is used.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .blocks import _same
from .layer import set_module


class _LastOutput(nn.Module):
    """Stands in for every block of a chain: returns the stored last-block output of the
    current model call (counted by a pre-hook on the model)."""

    def __init__(self, outputs: list[Any]):
        super().__init__()
        self.outputs = outputs
        self.call = -1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs[self.call]


@contextmanager
def blocks_skipped(model: nn.Module, blocks: list[str], outputs: list[Any]) -> Iterator[None]:
    """Within the context, model call ``i`` (counted from 0) skips the chain ``blocks``: each
    block returns ``outputs[i]``, the last block's output for that call."""
    stand_in = _LastOutput(outputs)
    saved = [model.get_submodule(b) for b in blocks]

    def count(mod: nn.Module, args: tuple) -> None:
        stand_in.call += 1

    handle = model.register_forward_pre_hook(count)
    for b in blocks:
        set_module(model, b, stand_in)
    try:
        yield
    finally:
        handle.remove()
        for b, mod in zip(blocks, saved):
            set_module(model, b, mod)


def tail_replayable(model: nn.Module, blocks: list[str], last: Any, inputs: dict[str, list[torch.Tensor]],
                    layers: list[str], run_first: Callable[[], None]) -> bool:
    """Whether ``layers`` (those after the chain) get bit-identical inputs in the first
    calibration pass (``run_first``) when the blocks are skipped (:func:`blocks_skipped`, returning ``last``,
    the last block's output in that pass) as the ``inputs`` they got when the blocks ran."""
    if any(n not in inputs for n in layers):
        return False
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda mod, inp, n=n: seen[n].append(inp[0]))
               for n in layers]
    try:
        with blocks_skipped(model, blocks, [last]):
            run_first()
    finally:
        for h in handles:
            h.remove()
    return all(_same(inputs[n], seen[n]) for n in layers)


__all__ = ["blocks_skipped", "tail_replayable"]
