"""Finding the chain of repeated blocks a model is made of (Transformer layers in an
``nn.ModuleList``, CNN stages, an ``nn.Sequential``), so calibration can run block by block
(GPTQ's scheme): block i's inputs are captured once and block i+1's come from the quantized block i.

A block list qualifies when, in one forward pass, each block is called once, in list order, each
block's first positional input is the previous block's output (or its first element), and every
other argument equals the first block's (attention masks, position embeddings), so the first
block's extra arguments can be replayed for all of them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def hidden(out: Any) -> torch.Tensor | None:
    """The hidden-state tensor of a block output: the tensor, or the first element of a tuple/list."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and (a is b or torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is b:
        return True
    if isinstance(a, (int, float, str, bool, type(None))) and type(a) is type(b):
        return a == b
    return False  # other objects (caches, ...) are only the same when identical


def _flatten(name: str, container: nn.Module) -> list[str]:
    """Blocks of a container: its children, with nested ModuleLists (no forward) expanded."""
    out = []
    for child_name, child in container.named_children():
        full = f"{name}.{child_name}" if name else child_name
        out += _flatten(full, child) if type(child) is nn.ModuleList else [full]
    return out


def candidates(model: nn.Module, targets: list[str]) -> list[list[str]]:
    """Block lists (``nn.ModuleList`` / ``nn.Sequential`` children) holding at least two target
    layers, those covering the most targets first."""
    found = []
    for name, mod in model.named_modules():
        if type(mod) not in (nn.ModuleList, nn.Sequential):
            continue
        blocks = _flatten(name, mod)
        covered = sum(any(t == b or t.startswith(b + ".") for b in blocks) for t in targets)
        if len(blocks) >= 2 and covered >= 2:
            found.append((covered, blocks))
    found.sort(key=lambda c: -c[0])  # stable: outer containers first among equals
    return [blocks for _, blocks in found]


@dataclass
class _Record:
    order: int = -1
    calls: int = 0
    first: torch.Tensor | None = None
    extras: tuple = ()
    out: torch.Tensor | None = None
    raw: Any = None  # the block's output as returned (the tuple / tensor ``out`` comes from)


@dataclass
class Probe:
    """One forward pass with hooks: target layers' call order and counts, which layer is fed the
    very tensor the layer called just before it got (q/k/v, gate/up: ``shares_input``), each
    candidate block's input, extra arguments and output (for :meth:`chain`), and the inputs of
    the ``watch`` layers."""

    model: nn.Module
    targets: dict[str, nn.Module]
    block_lists: list[list[str]]
    watch: set[str] = field(default_factory=set)  # layers whose inputs are kept (``inputs``)
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    first_call: dict[str, int] = field(default_factory=dict)
    blocks: dict[str, _Record] = field(default_factory=dict)
    shares_input: dict[str, str] = field(default_factory=dict)  # layer -> the previous layer, same input tensor
    _tick: int = 0
    _last: tuple[str, Any] | None = None  # (layer, its input tensor) of the latest layer call

    def _next(self) -> int:
        self._tick += 1
        return self._tick

    def run(self, forward: Callable[[], None]) -> None:
        handles = []
        for n, m in self.targets.items():
            handles.append(m.register_forward_pre_hook(lambda mod, inp, n=n: self._layer(n, inp)))
        for name in {b for bl in self.block_lists for b in bl}:
            mod = self.model.get_submodule(name)
            self.blocks[name] = rec = _Record()
            handles.append(mod.register_forward_pre_hook(
                lambda mod, args, kwargs, rec=rec: self._block_in(rec, args, kwargs), with_kwargs=True))
            handles.append(mod.register_forward_hook(lambda mod, inp, out, rec=rec: self._block_out(rec, out)))
        try:
            forward()
        finally:
            self._last = None
            for h in handles:
                h.remove()

    def _layer(self, name: str, inp: tuple) -> None:
        x = inp[0] if inp else None
        if name not in self.calls:
            self.first_call[name] = self._next()
            if self._last is not None and x is not None and self._last[1] is x:
                self.shares_input[name] = self._last[0]
        self._last = (name, x)
        if name in self.watch and x is not None:
            self.inputs.setdefault(name, []).append(x)
        self.calls[name] = self.calls.get(name, 0) + 1

    @staticmethod
    def _block_out(rec: _Record, out: Any) -> None:
        rec.out, rec.raw = hidden(out), out

    def _block_in(self, rec: _Record, args: tuple, kwargs: dict) -> None:
        rec.calls += 1
        if rec.calls == 1:
            rec.order = self._next()
            rec.first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            rec.extras = (args[1:], kwargs)

    def release(self) -> None:
        """Drop the recorded tensors (block inputs / outputs, watched inputs) and the references to
        the target layers; orders and counts stay."""
        self.inputs.clear()
        self.targets = {}
        for rec in self.blocks.values():
            rec.first, rec.extras, rec.out, rec.raw = None, (), None, None

    def chain(self) -> list[str] | None:
        """The first candidate block list that forms a chain in the recorded pass, or None."""
        for blocks in self.block_lists:
            recs = [self.blocks[b] for b in blocks]
            if any(r.calls != 1 or r.first is None for r in recs):
                continue
            if any(b.order <= a.order for a, b in zip(recs, recs[1:])):
                continue
            if all(_same(b.first, a.out) and _same(b.extras, recs[0].extras) for a, b in zip(recs, recs[1:])):
                return blocks
        return None


__all__ = ["candidates", "hidden", "Probe"]
