"""Checks on data handed to the quantizer or read from files: finite tensors, calibration batches
that fit the model. Errors name the tensor or batch and the cause."""
from __future__ import annotations

import torch
from torch import nn


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise ``ValueError`` naming the first floating-point tensor holding NaN or inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise ValueError(f"{where}: tensor {name!r} contains {what}")


def check_calibration(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Calibration inputs must be finite, in the model's float dtype, and accepted by its forward.

    ``batches``: input tensors (float images or integer token ids). Raises ``ValueError``.
    """
    param = next(iter(model.parameters()), None)
    for i, x in enumerate(batches):
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"calibration batch {i} has shape {list(x.shape)}: no samples")
        if not x.is_floating_point():
            continue
        if param is not None and x.dtype != param.dtype:
            raise ValueError(f"calibration batch {i} is {str(x.dtype)[6:]} but the model computes in "
                             f"{str(param.dtype)[6:]}; convert it (e.g. x.to({str(param.dtype)})")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"calibration batch {i} contains NaN or inf")
    if batches:
        try:
            with torch.no_grad():
                model(batches[0][:1])
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ValueError(f"calibration batch 0 of shape {list(batches[0].shape)} does not fit the model: "
                             f"{exc}") from exc


def input_shape_mismatch(model: nn.Module, x: torch.Tensor) -> list[int] | None:
    """The input shape (without batch) ``model`` was grown on, if ``x`` ``[B, ...]`` does not have
    it; None when it fits or the checkpoint recorded no shape (``model.adagrow_input_shape``)."""
    shape = getattr(model, "adagrow_input_shape", None)
    return None if shape is None or list(x.shape[1:]) == list(shape) else list(shape)
