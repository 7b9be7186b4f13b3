"""Model inputs for export: one tensor (``input``) or several named ones (Hugging Face style
``input_ids`` / ``attention_mask`` / ``token_type_ids``, passed as keyword arguments), outputs
unwrapped from ``ModelOutput`` / dicts / tuples, and which axes are dynamic.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

INPUT, OUTPUT = "input", "output"


def _as_tensor(x: object, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
    x = x.detach().cpu()
    if x.is_floating_point():
        if not torch.isfinite(x).all():
            raise ValueError(f"{what} contains NaN or inf")
        return x.float()
    return x


def named_inputs(example: object, what: str = "example_input") -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from a tensor (named ``input``), an ``(x, y)`` pair, or a mapping of names
    to tensors (dict / ``BatchEncoding``; ``None`` values are dropped). Floats become float32 CPU
    tensors (NaN / inf refused); token ids keep their integer dtype."""
    if isinstance(example, Mapping):
        out = {str(k): _as_tensor(v, f"{what}[{k!r}]") for k, v in example.items() if v is not None}
        if not out:
            raise ValueError(f"{what} is an empty mapping")
        return out
    if isinstance(example, (tuple, list)) and example:
        example = example[0]  # (x, y) calibration pair
    return {INPUT: _as_tensor(example, what)}


def _flatten(out: object) -> list[tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [(OUTPUT, out)]
    if isinstance(out, Mapping):  # ModelOutput is an OrderedDict without its None fields
        return [(str(k), v) for k, v in out.items() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [(f"{OUTPUT}_{i}", v) for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
    raise TypeError(f"model output of type {type(out).__name__} holds no tensors to export")


class NamedForward(nn.Module):
    """Positional tensors in, tuple of tensors out: what the ONNX exporter traces.

    A single ``input`` is passed positionally (``model(x)``); named inputs as keyword arguments.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, list(names)
        self.output_names: list[str] = []

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(*xs) if self.names == [INPUT] else self.model(**dict(zip(self.names, xs)))
        flat = _flatten(out)
        self.output_names = [n for n, _ in flat]
        return tuple(v for _, v in flat)


@dataclass
class InputSpec:
    """Names, example tensors and dynamic axes of an export."""

    names: list[str]
    example: dict[str, torch.Tensor]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    sequence: bool  # inputs' axis 1 is a dynamic sequence axis

    def args(self, feed: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        feed = self.example if feed is None else feed
        return tuple(feed[n] for n in self.names)


def resize_sequence(feed: Mapping[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Every input cut or tiled along axis 1 to ``length`` (token ids and masks stay valid)."""
    out = {}
    for n, x in feed.items():
        reps = -(-length // x.shape[1])
        out[n] = x.repeat(1, reps, *([1] * (x.dim() - 2)))[:, :length].contiguous()
    return out


@torch.no_grad()
def input_spec(model: nn.Module, example: dict[str, torch.Tensor], sequence: bool | None) -> InputSpec:
    """Run ``model`` on ``example`` (and, for sequence models, on a shorter sequence) to name the
    outputs and find their batch / sequence axes.

    ``sequence=None``: named inputs (a mapping) that all share axis 1 are sequences; one tensor
    input is not (its dims after the batch are fixed, as for images).
    """
    names = list(example)
    lengths = {x.shape[1] for x in example.values() if x.dim() >= 2}
    if sequence is None:
        sequence = names != [INPUT] and len(lengths) == 1 and all(x.dim() >= 2 for x in example.values())
    if sequence and (len(lengths) != 1 or any(x.dim() < 2 for x in example.values())):
        raise ValueError(f"a dynamic sequence axis needs every input shaped [B, L, ...] with one L, got "
                         f"{ {n: tuple(x.shape) for n, x in example.items()} }")
    fwd = NamedForward(model, names).eval()
    try:
        outs = fwd(*(example[n] for n in names))
    except (RuntimeError, IndexError, TypeError) as exc:  # torch's own error names no input
        shapes = {n: list(x.shape) for n, x in example.items()}
        raise ValueError(f"the example input {shapes} does not fit the model: {exc}") from exc
    out_names = fwd.output_names
    for n, o in zip(out_names, outs):
        if o.is_floating_point() and not torch.isfinite(o).all():
            raise ValueError(f"the model's output {n!r} is NaN or inf on the example input")
    axes = {n: {0: "batch"} for n in names}
    out_axes = {n: {0: "batch"} for n in out_names}
    if sequence:
        seq = lengths.pop()
        for n in names:
            axes[n][1] = "sequence"
        if seq > 1:  # output dims that follow the sequence length
            short = fwd(*resize_sequence(example, seq - 1).values())
            for n, a, b in zip(out_names, outs, short):
                for d in range(1, a.dim()):
                    if a.shape[d] != b.shape[d]:
                        out_axes[n][d] = "sequence"
    return InputSpec(names, example, out_names, {**axes, **out_axes}, bool(sequence))


def stack_batches(batches: Iterable[object], spec: InputSpec, what: str = "calibration batch") -> list[dict[str, torch.Tensor]]:
    """Normalise batches to ``{name: tensor}`` with the example's names, dtypes and non-dynamic dims."""
    out = []
    for i, b in enumerate(batches or []):
        feed = named_inputs(b, f"{what} {i}")
        if set(feed) != set(spec.names):
            raise ValueError(f"{what} {i} has inputs {list(feed)}, the example has {spec.names}")
        for n in spec.names:
            x, ref = feed[n], spec.example[n]
            fixed = slice(2 if spec.sequence else 1, None)
            if x.dim() != ref.dim() or tuple(x.shape[fixed]) != tuple(ref.shape[fixed]):
                dims = ", ".join(["B", "L"][: fixed.start] + [str(d) for d in ref.shape[fixed]])
                raise ValueError(f"{what} {i}: input {n!r} of shape {tuple(x.shape)} does not match the "
                                 f"example input [{dims}]")
        out.append({n: feed[n] for n in spec.names})
    return out


def to_numpy(feed: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: x.numpy() for n, x in feed.items()}
