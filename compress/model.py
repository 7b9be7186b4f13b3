"""Model-level quantization: every Linear / Conv2d, sequentially in forward order, each layer's
Hessian taken from the outputs of the already quantized prefix (DESIGN §1)."""
from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import check_calibration
from .grid import check_bits
from .groups import check_group_size
from .layer import geometry, set_module
from .obs import OBSQuantizer, QuantResult, rtn_quantize
from .order import check_order
from .qmodules import _QuantLayer, from_result

METHODS = ("obs", "rtn")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class QuantConfig:
    """How to quantize a model.

    ``group_size`` applies to convs; ``"position"`` / ``"tier"`` are conv-only, so Linear layers
    use ``linear_group_size`` (default: ``group_size`` when it is an int, else -1 per channel).
    ``skip`` holds module names or fnmatch patterns (e.g. ``"stem.*"``, ``"fc"``) left in float.
    Defaults (overlap-tier groups, reparam order) are the best error per scale measured by
    ``benchmarks/quant_quality.py`` (results in ``benchmarks/results/quant_quality_cpu.json``).
    """

    bits: int = 4
    group_size: int | str = "tier"
    linear_group_size: int | None = None
    sym: bool = False
    method: str = "obs"
    order: str = "reparam"
    percdamp: float = 0.01
    block_size: int = 128
    mse: bool = False
    scale_dtype: str = "float16"
    skip: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> "QuantConfig":
        check_bits(self.bits)
        check_group_size(self.group_size, is_conv=True)
        check_group_size(self.group_size_for("linear"), is_conv=False)
        check_order(self.order)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if isinstance(self.skip, str):
            raise ValueError("skip must be a list of names or patterns, not a single string")
        self.skip = tuple(self.skip)
        return self

    def group_size_for(self, kind: str) -> int | str:
        if kind == "conv":
            return self.group_size
        if self.linear_group_size is not None:
            return self.linear_group_size
        return self.group_size if isinstance(self.group_size, int) else -1


class _StopForward(Exception):
    """Raised by a calibration hook once the layer's inputs are captured."""


def batch_inputs(batch: object) -> torch.Tensor:
    """The input tensor of a calibration batch (a tensor, or the x of an (x, y) pair)."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"calibration batches must be tensors or (x, y) pairs, got {type(batch).__name__}")
    return batch


def _targets(model: nn.Module, skip: tuple[str, ...]) -> dict[str, nn.Module]:
    found, matched = {}, set()
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or isinstance(mod, _QuantLayer):
            continue
        hits = [p for p in skip if fnmatch.fnmatchcase(name, p)]
        matched.update(hits)
        if not hits:
            geometry(mod, name)  # unsupported variants (padding_mode, string padding) fail here
            found[name] = mod
    unmatched = [p for p in skip if p not in matched]
    if unmatched:
        raise ValueError(f"skip patterns {unmatched} match no Linear/Conv2d layer of the model")
    return found


def _forward_order(model: nn.Module, targets: dict[str, nn.Module], x: torch.Tensor) -> dict[str, int]:
    """Target names in the order the forward pass calls them, with how often each is called."""
    calls: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
             for n, m in targets.items()]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _calibrate(model: nn.Module, layer: nn.Module, q: OBSQuantizer, batches: list[torch.Tensor],
               stop_early: bool) -> None:
    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        q.add_batch(inp[0])
        if stop_early:
            raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        for x in batches:
            try:
                model(x)
            except _StopForward:
                pass
    finally:
        handle.remove()


@torch.no_grad()
def quantize(model: nn.Module, calib: Iterable | None, config: QuantConfig | None = None,
             progress: bool = True) -> nn.Module:
    """Return a quantized copy of ``model`` (the original is untouched).

    Args:
        model: a deploy-form model (run :func:`adagrow.grow.reparam.reparameterize` first).
        calib: iterable of input tensors or ``(x, y)`` pairs; iterated once and kept in memory.
            May be None only for ``method="rtn"``.
        config: :class:`QuantConfig` (default: W4 OBS).
        progress: show a tqdm bar over layers.

    Every quantized layer becomes a :class:`QuantLinear` / :class:`QuantConv2d`; per-layer OBS
    loss and damping are kept in ``model.adagrow_quant["layers"]``.
    """
    config = copy.deepcopy(config or QuantConfig()).validate()
    qmodel = copy.deepcopy(model).eval()
    targets = _targets(qmodel, config.skip)
    batches = [] if calib is None else [batch_inputs(b) for b in calib]
    if not batches and config.method == "obs":
        raise ValueError("OBS quantization needs calibration data: calib is empty")
    device = next(iter(qmodel.parameters())).device
    batches = [b.to(device) for b in batches]
    check_calibration(qmodel, batches)
    if batches:
        calls = _forward_order(qmodel, targets, batches[0])
        unused = [n for n in targets if n not in calls]
        if unused:
            warnings.warn(f"layers never called in forward, left in float: {unused}", stacklevel=2)
    else:
        calls = {n: 1 for n in targets}
    sdt = SCALE_DTYPES[config.scale_dtype]
    report = {}
    for name in tqdm(list(calls), desc=f"quantize W{config.bits} {config.method}", disable=not progress):
        layer = targets[name]
        kind = geometry(layer, name).kind
        gs = config.group_size_for(kind)
        if config.method == "rtn":
            res: QuantResult = rtn_quantize(layer, config.bits, gs, config.sym, config.mse,
                                            scale_dtype=sdt, name=name)
        else:
            q = OBSQuantizer(layer, name)
            _calibrate(qmodel, layer, q, batches, stop_early=calls[name] == 1)
            res = q.quantize(config.bits, gs, config.sym, config.order, percdamp=config.percdamp,
                             block_size=config.block_size, mse=config.mse, scale_dtype=sdt)
            del q
        set_module(qmodel, name, from_result(layer, res, name))
        report[name] = {"loss": res.loss, "damp": res.damp}
    qmodel.adagrow_quant = {"config": asdict(config), "layers": report}
    return qmodel
