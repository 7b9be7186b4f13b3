"""Checks on data handed to the quantizer or read from files: finite tensors, calibration batches
that fit the model. Errors name the tensor or batch and the cause."""
from __future__ import annotations

import torch
from torch import nn


def check_int(value: object, name: str, low: int, high: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` (not a bool) in ``low..high`` (no upper bound: None)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf, from one min/max reduction (NaN propagates through it):
    ``torch.isfinite(t).all()`` allocates about twice ``t`` in temporaries (measured on a
    2048 x 4096 float32 matrix: +59 MB)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise ``ValueError`` naming the first floating-point tensor holding NaN or inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise ValueError(f"{where}: tensor {name!r} contains {what}")


def check_calibration(model: nn.Module, calls: list[tuple[tuple, dict]]) -> None:
    """Calibration inputs must be finite, in the model's float dtype, and of one feature size.

    ``calls``: ``(args, kwargs)`` of each model call, holding float images or integer token ids.
    Whether they fit the model's forward is checked by the first forward pass on them
    (:func:`first_sample`, :func:`forward_fits`). Raises ``ValueError``.
    """
    param = next(iter(model.parameters()), None)
    for i, (args, kwargs) in enumerate(calls):
        for x in (*args, *kwargs.values()):
            if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] == 0):
                raise ValueError(f"calibration batch {i} has shape {list(x.shape)}: no samples")
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                continue
            if param is not None and x.dtype != param.dtype:
                raise ValueError(f"calibration batch {i} is {str(x.dtype)[6:]} but the model computes in "
                                 f"{str(param.dtype)[6:]}; convert it (e.g. x.to({str(param.dtype)})")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"calibration batch {i} contains NaN or inf")
    _check_feature_dims(calls)


def first_sample(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """A model call cut to its first sample: every tensor argument with a batch dimension sliced ``[:1]``."""
    args, kwargs = call
    first = lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() else t  # noqa: E731
    return tuple(map(first, args)), {k: first(v) for k, v in kwargs.items()}


def forward_fits(model: nn.Module, call: tuple[tuple, dict], shown: tuple[tuple, dict] | None = None) -> None:
    """Run ``model`` on ``call``; an error of the forward becomes a ``ValueError`` naming calibration
    batch 0 and the shapes of ``shown`` (default ``call``: the batch the call was cut from)."""
    args, kwargs = call
    s_args, s_kwargs = shown or call
    shapes = [list(t.shape) for t in (*s_args, *s_kwargs.values()) if isinstance(t, torch.Tensor)]
    try:
        model(*args, **kwargs)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        shape = shapes[0] if len(shapes) == 1 else shapes
        raise ValueError(f"calibration batch 0 of shape {shape} does not fit the model: {exc}") from exc


def _check_feature_dims(calls: list[tuple[tuple, dict]]) -> None:
    """Float inputs of every batch have batch 0's feature size (dim 1 of images, the last dim
    otherwise; lengths may vary), so a later batch fails with its index, not a torch error."""
    def dims(call: tuple[tuple, dict]) -> list[tuple[int, int]]:
        return [(x.dim(), x.shape[1] if x.dim() == 4 else x.shape[-1]) for x in (*call[0], *call[1].values())
                if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 1]
    first = dims(calls[0]) if calls else []
    for i, call in enumerate(calls[1:], 1):
        if dims(call) != first:
            raise ValueError(f"calibration batch {i} has (rank, features) {dims(call)}, but batch 0 has {first}: "
                             "every batch must have the model's channels / features")


def input_shape_mismatch(model: nn.Module, x: torch.Tensor) -> list[int] | None:
    """The input shape (without batch) ``model`` was grown on, if ``x`` ``[B, ...]`` does not have
    it; None when it fits or the checkpoint recorded no shape (``model.adagrow_input_shape``)."""
    shape = getattr(model, "adagrow_input_shape", None)
    return None if shape is None or list(x.shape[1:]) == list(shape) else list(shape)
