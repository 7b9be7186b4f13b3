"""Calibration inputs the way peers take them, and padding-aware layer inputs.

``calib`` for :func:`adagrow.compress.quantize` is either an iterable of batches or a
``forward_loop(model)`` callable (ModelOpt's convention: it runs the model over the calibration
data; it is called once per calibration pass, so it must be re-runnable). A batch is

- a tensor ``x`` -> ``model(x)``;
- an ``(x, y)`` pair (tuple/list) -> ``model(x)``; the rest of the tuple is ignored;
- a mapping (``dict``, Hugging Face ``BatchEncoding``) -> ``model(**batch)``.

When the model is called with an ``attention_mask`` keyword (``[B, T]``, 1 = token, 0 = padding),
padded positions are dropped from Linear layers' inputs before they reach a Hessian.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from adagrow.checks import check_calibration, first_sample, forward_fits

Call = tuple[tuple, dict[str, Any]]  # positional and keyword arguments of one model call


class StopForward(Exception):
    """Raised by a calibration hook once it has what it needs from a forward pass."""


def _looks_like_mask(x: torch.Tensor, y: object) -> bool:
    """An (ids, mask) tuple: integer ids and a same-shape 0/1 tensor with some zeros."""
    return (isinstance(y, torch.Tensor) and not x.is_floating_point() and y.shape == x.shape
            and not y.is_floating_point() and bool(((y == 0) | (y == 1)).all()) and bool((y == 0).any()))


def batch_call(batch: object, index: int = 0) -> Call:
    """The ``(args, kwargs)`` a calibration batch calls the model with (see the module doc)."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Mapping):
        batch = batch[0]
    if isinstance(batch, Mapping):
        bad = [k for k in batch if not isinstance(k, str)]
        if bad:
            raise TypeError(f"calibration batch {index}: mapping keys must be argument names, got {bad[:3]}")
        return (), dict(batch)
    if isinstance(batch, (tuple, list)) and batch:
        if isinstance(batch[0], torch.Tensor) and len(batch) > 1 and _looks_like_mask(batch[0], batch[1]):
            raise ValueError(f"calibration batch {index} is an (input_ids, attention_mask)-like tuple; tuples are "
                             "(x, y) pairs and only x is used. Pass a dict or BatchEncoding instead, e.g. "
                             "{'input_ids': ids, 'attention_mask': mask}")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"calibration batch {index}: expected a tensor, an (x, y) pair, a dict / BatchEncoding "
                        f"of model inputs, or pass a forward_loop(model) callable; got {type(batch).__name__}")
    return (batch,), {}


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor (inside tuples, lists and dicts too) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class Calibration:
    """Calibration data: a list of model calls, or a ``forward_loop(model)`` callable."""

    def __init__(self, calib: Iterable | Callable[[nn.Module], Any] | None, model: nn.Module):
        self.loop: Callable[[nn.Module], Any] | None = None
        self.calls: list[Call] = []
        if callable(calib) and not isinstance(calib, (nn.Module, torch.Tensor)):
            self.loop = calib
            return
        if isinstance(calib, (torch.Tensor, Mapping)):
            raise TypeError("calib must be an iterable of batches (e.g. [x] or x.split(64)) or a "
                            f"forward_loop(model) callable, not a single {type(calib).__name__}")
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        self.calls = [to_device(batch_call(b, i), device) for i, b in enumerate(calib or [])]
        check_calibration(model, self.calls)

    def __bool__(self) -> bool:
        return self.loop is not None or bool(self.calls)

    def run(self, model: nn.Module) -> None:
        """One calibration pass over all the data; a hook may end each forward with StopForward."""
        if self.loop is not None:
            self.loop(model)
            return
        for args, kwargs in self.calls:
            try:
                model(*args, **kwargs)
            except StopForward:
                pass

    def run_first(self, model: nn.Module) -> None:
        """One forward pass on the first sample of the first batch (or the loop's first model call,
        as it is): enough for the model's structure (which layers run, in what order, on which
        tensors) at a fraction of a batch's cost; it also checks that the batches fit the model
        (a ``ValueError`` naming batch 0 otherwise)."""
        if self.loop is None:
            forward_fits(model, first_sample(self.calls[0]), shown=self.calls[0])
            return

        def stop(mod: nn.Module, inp: tuple, out: Any) -> None:
            raise StopForward

        handle = model.register_forward_hook(stop)
        try:
            self.loop(model)
        except StopForward:
            pass
        else:
            raise ValueError("forward_loop(model) never called the model")
        finally:
            handle.remove()


class TokenMask:
    """The ``attention_mask`` of the model call in progress (set by a pre-hook on the model, or
    by hand when blocks run alone), used to drop padded positions from layer inputs."""

    def __init__(self, model: nn.Module):
        self.mask: torch.Tensor | None = None
        self._handle = model.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def remove(self) -> None:
        self._handle.remove()

    def valid(self, inp: torch.Tensor) -> torch.Tensor:
        """The rows of a Linear input ``[B, T, ..., K]`` (or ``[B*T, K]``) at unpadded positions."""
        m = self.mask
        if m is None:
            return inp
        if inp.dim() >= 3 and tuple(inp.shape[:2]) == tuple(m.shape):
            return inp[m.to(device=inp.device, dtype=torch.bool)]
        if inp.dim() == 2 and inp.shape[0] == m.numel():
            return inp[m.reshape(-1).to(device=inp.device, dtype=torch.bool)]
        return inp


__all__ = ["Calibration", "TokenMask", "StopForward", "batch_call", "to_device"]
