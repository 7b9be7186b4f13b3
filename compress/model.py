"""Model-level quantization: every Linear / Conv2d, sequentially in forward order, each layer's
Hessian taken from the outputs of the already quantized prefix (docs/design.md §1).

Models built from a chain of blocks (:mod:`.blocks`) are calibrated block by block: block i's
inputs are captured once, its layers are quantized in order by running the block alone, and the
quantized block's outputs are block i+1's inputs, so forward work grows linearly with depth.
Other models (and the layers before / after the blocks) run the whole model for each layer.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Callable, Collection, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from adagrow.checks import check_int

from .blocks import Probe, candidates, hidden
from .calib import Calibration, StopForward, TokenMask
from .grid import check_bits, check_sym_grid
from .groups import check_group_size
from .layer import geometry, set_module
from .obs import TARGET_DAMP, OBSQuantizer, QuantResult, check_groups, fit_targets, folds_target, rtn_quantize
from .order import check_order
from .qmodules import SCALE_DTYPES, QuantLayer, from_result
from .ranks import Owners
from .server_formats import guard_save_pretrained
from .tail import blocks_skipped, tail_replayable

METHODS = ("obs", "rtn")
HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# layers with weights adagrow has no quantized form for: left in float, named in adagrow_quant["float"]
UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.RNNBase)
DEFAULT_IGNORE = ("lm_head", "*.lm_head", "embed_out", "*.embed_out")


@dataclass
class QuantConfig:
    """How to quantize a model.

    ``group_size`` applies to convs; ``"position"`` / ``"tier"`` are conv-only, so Linear layers
    use ``linear_group_size`` (default: ``group_size`` when it is an int, else -1 per channel).
    ``skip`` holds module names or fnmatch patterns (e.g. ``"stem.*"``, ``"fc"``) left in float;
    each must match a layer (a typo is an error). ``ignore`` holds patterns left in float when
    present (default: language-model heads, as peers do). Linear layers whose weight is tied to
    another parameter (an LM head tied to the embedding) are always left in float.
    Defaults (overlap-tier groups, reparam order) are the best error per scale measured by
    ``benchmarks/quant_quality.py`` (results in ``benchmarks/results/quant_quality_cpu.json``).
    ``hessian_dtype``: float32 (default, as the reference GPTQ) or float64 for the layer
    statistics and the OBS solve; float64 makes data-parallel runs (:meth:`OBSQuantizer.all_reduce`)
    match one process to summation-order rounding (docs/scale.md).
    ``float_target`` (models calibrated block by block): each layer inside a block fits the float
    model's output of that layer on float inputs, not its own output on the quantized prefix's
    inputs, so it also corrects the error earlier layers left (GPTQv2); it costs one float forward
    of each block and keeps the float inputs of the block's layers during that block (for a
    folded down projection, :func:`.obs.folds_target`, its float outputs less the bias instead).
    ``target_damp``: ridge of the float-target fit relative to mean(diag H) (docs/design.md §4).
    ``groups``: ``"static"`` (scale and zero point of each group from the weights before OBS) or
    ``"dynamic"`` (from the weights as OBS updated them when it reaches the group, as the reference GPTQ).
    ``scale_refit``: after OBS, each row's scales are refitted by least squares to the codes chosen
    (the layer objective, docs/design.md §4); off by default: it helped SmolLM2 W4 g128 and hurt the
    CLI's g64 default (docs/llm.md "W4 g128: which OBS options matter", Scale refit).
    ``bias_refit`` (layers with a bias; default on): OBS runs on the input covariance (the
    statistics centred on the mean input) and the bias is refitted after quantization so the
    layer's mean output on the calibration data is the float layer's (docs/design.md §4).
    ``cd_passes`` (default 0, off): sweeps of exact coordinate descent over the columns after OBS (QuantEase),
    each moving a column's codes to the grid point nearest their best value given the other
    columns; the layer loss never rises (docs/design.md §4).
    ``sym_grid`` (with ``sym=True``): ``"signed"`` (default: all ``2^bits`` codes, the weight of
    largest magnitude on code 0, scales may be negative) or ``"restricted"`` (codes ``z +- (2^(bits-1) - 1)``,
    positive scales); docs/design.md §4.
    """

    bits: int = 4
    group_size: int | str = "tier"
    linear_group_size: int | None = None
    sym: bool = False
    sym_grid: str = "signed"
    method: str = "obs"
    order: str = "reparam"
    percdamp: float = 0.01
    block_size: int = 128
    mse: bool = False
    float_target: bool = True
    target_damp: float = TARGET_DAMP
    groups: str = "static"
    scale_refit: bool = False
    bias_refit: bool = True
    cd_passes: int = 0
    scale_dtype: str = "float16"
    hessian_dtype: str = "float32"
    skip: tuple[str, ...] = field(default_factory=tuple)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    def validate(self) -> "QuantConfig":
        for key in ("sym", "mse", "float_target", "scale_refit", "bias_refit"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}")
        for key in ("percdamp", "target_damp"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), (int, float)):
                raise ValueError(f"{key} must be a number, got {getattr(self, key)!r}")
        check_int(self.block_size, "block_size", 1)
        check_bits(self.bits)
        check_group_size(self.group_size, is_conv=True)
        check_group_size(self.group_size_for("linear"), is_conv=False)
        check_order(self.order)
        check_sym_grid(self.sym_grid)
        check_groups(self.groups, self.order)
        if not self.target_damp > 0:
            raise ValueError(f"target_damp must be > 0, got {self.target_damp}")
        check_int(self.cd_passes, "cd_passes", 0)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise ValueError(f"hessian_dtype must be one of {tuple(HESSIAN_DTYPES)}, got {self.hessian_dtype!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        for key in ("skip", "ignore"):
            if isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a list of names or patterns, not a single string")
            setattr(self, key, tuple(getattr(self, key)))
        return self

    def group_size_for(self, kind: str) -> int | str:
        if kind == "conv":
            return self.group_size
        if self.linear_group_size is not None:
            return self.linear_group_size
        return self.group_size if isinstance(self.group_size, int) else -1


def _tied(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights, shared modules)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def quant_targets(model: nn.Module, config: QuantConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Layers to quantize, and those left in float with the reason (warned for layer types adagrow
    cannot quantize). Refuses a model that already holds quantized layers and one with nothing to
    quantize."""
    found, left, unsupported, matched = {}, {}, {}, set()
    tied = _tied(model)
    done = [name for name, mod in model.named_modules() if isinstance(mod, QuantLayer)]
    if done:
        raise ValueError(f"the model already holds quantized layers ({done[:3]}{' ...' if len(done) > 3 else ''}): "
                         "quantize the float model")
    train_form = [name for name, mod in model.named_modules()  # RepConv2d's API (grow.reparam), duck-typed
                  if callable(getattr(mod, "fuse", None)) and hasattr(mod, "branch_modules")]
    if train_form:
        raise ValueError(f"the model is in its train-time form (multi-branch blocks at {train_form[:3]}): quantize the "
                         "deploy form, adagrow.grow.reparam.reparameterize(model.eval())")
    # torch's own transformer layers read linear1.weight etc. in their fast path: a QuantLinear has none
    fast_path = [name + "." for name, mod in model.named_modules()
                 if isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))]
    for name, mod in model.named_modules():
        if isinstance(mod, UNSUPPORTED):
            unsupported[name] = f"{type(mod).__name__} is not supported (Linear and Conv2d are)"
            continue
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if any(name.startswith(prefix) for prefix in fast_path):
            unsupported[name] = "inside a torch.nn.Transformer*Layer, whose fast path reads the float weight"
            continue
        hits = [p for p in config.skip if fnmatch.fnmatchcase(name, p)]
        matched.update(hits)
        if hits:
            left[name] = "skip"
        elif any(fnmatch.fnmatchcase(name, p) for p in config.ignore):
            left[name] = "ignore"
        elif id(mod.weight) in tied:
            left[name] = "tied weight"
        else:
            geometry(mod, name)  # unsupported variants (padding_mode, string padding) fail here
            found[name] = mod
    unmatched = [p for p in config.skip if p not in matched]
    if unmatched:
        raise ValueError(f"skip patterns {unmatched} match no Linear/Conv2d layer of the model")
    left.update(unsupported)
    if not found:
        raise ValueError("the model has no Linear or Conv2d layer to quantize"
                         + (f" (left in float: {unsupported})" if unsupported else ""))
    if unsupported:
        warnings.warn(f"left in float: {unsupported}", stacklevel=5)  # quantize()'s caller
    return found, left


@contextmanager
def _calibration_mode(model: nn.Module):
    """Hugging Face models: no KV cache while calibrating (a cache would grow on every replay)."""
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    if use_cache:
        cfg.use_cache = False
    try:
        yield
    finally:
        if use_cache:
            cfg.use_cache = use_cache


def input_groups(layers: list[str], calls: dict[str, int], shares_input: dict[str, str]) -> list[list[str]]:
    """``layers`` (forward order) cut into groups calibrated by one replay: consecutive layers
    called once per forward and fed the identical input tensor (q/k/v, gate/up) share a group,
    as GPTQModel's true-sequential mode; every other layer is a group of its own."""
    groups: list[list[str]] = []
    for name in layers:
        prev = groups[-1][-1] if groups else None
        if prev is not None and calls[name] == calls[prev] == 1 and shares_input.get(name) == prev:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


class _Run:
    """Quantizes layers a group at a time; a group's Hessian comes from a calibration pass
    (``run()``) through the already quantized prefix."""

    def __init__(self, model: nn.Module, config: QuantConfig, mask: TokenMask | None):
        self.model, self.config, self.mask = model, config, mask
        self.report: dict[str, dict[str, float]] = {}
        self.deferred: list[tuple[str, nn.Module, QuantResult]] = []
        self.owners = Owners()  # under torch.distributed: which rank solves each layer
        # the float model's input to the layer for the next call (its output less the bias: _float_out)
        self.target: torch.Tensor | None = None
        self.before_block: Callable[[str], None] | None = None
        self.after_block: Callable[[str], None] | None = None

    def layer(self, name: str, run: Callable[[], None] | None = None, stop_early: bool = False,
              defer: bool = False) -> None:
        """Quantize layer ``name`` (see :meth:`group`)."""
        self.group([name], run, stop_early, defer)

    def group(self, names: list[str], run: Callable[[], None] | None = None, stop_early: bool = False,
              defer: bool = False) -> None:
        """Quantize layers ``names``, fed the identical input, from one calibration pass: the
        first layer's statistics are shared by the others (one Hessian, one inverse).
        ``defer``: keep the float modules with the dequantized weights (the same numbers, no
        unpacking on every calibration call) until :meth:`swap`."""
        cfg = self.config
        layers = [self.model.get_submodule(n) for n in names]
        sdt = SCALE_DTYPES[cfg.scale_dtype]
        owners = self.owners.place(names, layers)  # data-parallel: each layer solved by one rank (.ranks)
        mine = [i for i, o in enumerate(owners) if o == self.owners.rank]
        results: dict[int, QuantResult] = {}
        if cfg.method == "rtn":
            for i in mine:
                gs = cfg.group_size_for(geometry(layers[i], names[i]).kind)
                results[i] = rtn_quantize(layers[i], cfg.bits, gs, cfg.sym, cfg.mse, scale_dtype=sdt, name=names[i],
                                          sym_grid=cfg.sym_grid)
        else:
            lead = OBSQuantizer(layers[0], names[0], HESSIAN_DTYPES[cfg.hessian_dtype], cfg.target_damp,
                                fold_target=len(layers) == 1)
            is_linear, float_out = isinstance(layers[0], nn.Linear), _float_out(layers)

            def hook(mod: nn.Module, inp: tuple) -> None:
                x, t = inp[0], self.target
                x = self.mask.valid(x) if is_linear else x
                t = None if t is None else self.mask.valid(t) if is_linear else t
                if float_out:
                    lead.add_batch(x, float_out=t)
                else:
                    lead.add_batch(x, t)
                if stop_early:
                    raise StopForward

            # a pre-hook: with ``stop_early`` the replay ends before the first layer's own product
            handle = layers[0].register_forward_pre_hook(hook)
            try:
                run()
            finally:
                handle.remove()
            lead.all_reduce()  # data-parallel calibration: every rank's samples (a no-op on one process)
            if cfg.bias_refit and all(layer.bias is not None for layer in layers):
                lead.center()
            quantizers = {i: lead if i == 0 else OBSQuantizer(layers[i], names[i], HESSIAN_DTYPES[cfg.hessian_dtype],
                                                              cfg.target_damp) for i in mine}
            for i, q in quantizers.items():
                if i:
                    q.share(lead)
            if 0 not in quantizers:
                lead.release()  # another rank solves the first layer
            fit_targets(list(quantizers.values()))  # first, so the float-target statistics are freed before the inverses
            for i, q in quantizers.items():
                gs = cfg.group_size_for(geometry(layers[i], names[i]).kind)
                last = i == mine[-1]
                results[i] = q.quantize(cfg.bits, gs, cfg.sym, cfg.order, percdamp=cfg.percdamp,
                                        block_size=cfg.block_size, mse=cfg.mse, scale_dtype=sdt, release=last,
                                        sym_grid=cfg.sym_grid, groups=cfg.groups, refit=cfg.scale_refit,
                                        passes=cfg.cd_passes)
                if not last:
                    q.release()  # the group's statistics are freed by the last layer's quantize
        shared = self.owners.share(results, owners)
        for name, layer, res in zip(names, layers, shared):
            self.report[name] = {"loss": res.loss, "damp": res.damp}
            if defer:
                layer.weight.data.copy_(res.weight)
                if res.bias is not None:
                    layer.bias.data.copy_(res.bias)
                res.weight = layer.weight.data  # not a second float copy of the block's weights
                self.deferred.append((name, layer, res))
            else:
                set_module(self.model, name, from_result(layer, res, name))

    def swap(self) -> None:
        """Replace the deferred layers by their quantized modules."""
        for name, layer, res in self.deferred:
            set_module(self.model, name, from_result(layer, res, name))
        self.deferred.clear()


def _float_out(layers: list[nn.Module]) -> bool:
    """Whether a group's float target is its float layer's output less the bias (not its input): a
    group of one Linear whose statistics fold (:func:`.obs.folds_target`)."""
    return len(layers) == 1 and isinstance(layers[0], nn.Linear) and folds_target(layers[0])


def _capture(model: nn.Module, block: str, cal: Calibration, mask: TokenMask) -> list[tuple]:
    """Inputs of ``block`` for every calibration batch: (args, kwargs, attention mask)."""
    inputs = []

    def grab(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append((args, kwargs, mask.mask))
        if cal.loop is None:
            raise StopForward

    handle = model.get_submodule(block).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        cal.run(model)
    finally:
        handle.remove()
    return inputs


def _float_pass(block: nn.Module, subs: list[str], inputs: list[tuple],
                outs: Collection[str] = ()) -> tuple[dict[str, list], list[tuple]]:
    """Run the float ``block`` once per batch: the inputs of its submodules ``subs`` per batch (for
    those in ``outs``, Linear layers, their outputs less the bias instead), and the block outputs as
    the next block's inputs."""
    seen: dict[str, list] = {s: [] for s in subs}
    handles = [block.get_submodule(s).register_forward_hook(
                   lambda mod, inp, out, s=s: seen[s].append(out if mod.bias is None else out - mod.bias))
               if s in outs else
               block.get_submodule(s).register_forward_pre_hook(lambda mod, inp, s=s: seen[s].append(inp[0]))
               for s in subs]
    outputs = []
    try:
        for args, kwargs, m in inputs:
            outputs.append(((hidden(block(*args, **kwargs)), *args[1:]), kwargs, m))
    finally:
        for h in handles:
            h.remove()
    return seen, outputs


def _block_by_block(run: _Run, blocks: list[str], layers: list[str], calls: dict[str, int],
                    shares_input: dict[str, str], inputs: list[tuple], bar: tqdm) -> list[Any]:
    """Quantize each block's layers in forward order from the block's captured inputs, one
    replay per group of layers sharing an input, then run the quantized block to get the next
    block's inputs. With ``float_target``, a float copy of the block runs once per batch on the
    float model's block inputs and gives each group its target (kept for the block: the float
    inputs of every group, one block's worth of activations per group; for a folded down
    projection, :func:`.obs.folds_target`, its float outputs less the bias instead). Returns the
    last quantized block's outputs (one per calibration batch)."""
    model, mask = run.model, run.mask
    float_target = run.config.float_target and run.config.method == "obs"
    finputs = inputs
    for block in blocks:
        if run.before_block is not None:
            run.before_block(block)
        mod = model.get_submodule(block)
        names = [n for n in layers if n == block or n.startswith(block + ".")]
        groups = input_groups(names, calls, shares_input)
        paired = {g[0] for g in groups if calls[g[0]] == 1}  # a layer called once per forward pairs up
        folded = {g[0][len(block) + 1:] for g in groups  # the float pass keeps these layers' outputs
                  if g[0] in paired and _float_out([model.get_submodule(n) for n in g])}
        ftargets: dict[str, list] = {}
        foutputs = inputs
        if float_target:
            ftargets, foutputs = _float_pass(copy.deepcopy(mod), [n[len(block) + 1:] for n in paired], finputs, folded)

        def replay(lead: str, mod: nn.Module = mod, block: str = block, ftargets: dict = ftargets) -> None:
            targets = ftargets.get(lead[len(block) + 1:])
            for i, (args, kwargs, m) in enumerate(inputs):
                mask.mask = m
                run.target = None if targets is None else targets[i]
                try:
                    mod(*args, **kwargs)
                except StopForward:
                    pass
            run.target = None

        for group in groups:
            run.group(group, lambda lead=group[0]: replay(lead), stop_early=calls[group[0]] == 1, defer=True)
        del ftargets
        outputs, raw = [], []
        for args, kwargs, m in inputs:
            mask.mask = m
            raw.append(mod(*args, **kwargs))
            outputs.append(((hidden(raw[-1]), *args[1:]), kwargs, m))
        run.swap()
        if run.after_block is not None:
            run.after_block(block)
        inputs, finputs = outputs, foutputs if float_target else outputs
        bar.update()
    mask.mask = None
    return raw


@torch.no_grad()
def quantize(model: nn.Module, calib: Iterable | Callable[[nn.Module], Any] | None,
             config: QuantConfig | None = None, progress: bool = True, inplace: bool = False) -> nn.Module:
    """Quantize every Linear / Conv2d of ``model`` (a copy unless ``inplace=True``).

    Args:
        model: a deploy-form model (run :func:`adagrow.grow.reparam.reparameterize` first) or a
            Hugging Face / plain PyTorch model.
        calib: an iterable of batches (tensors, ``(x, y)`` pairs, dicts / ``BatchEncoding`` passed
            as keyword arguments) kept in memory, or a ``forward_loop(model)`` callable run once
            per calibration pass (see :mod:`.calib`). An ``attention_mask`` keyword keeps padded
            positions out of the Hessians. May be None only for ``method="rtn"``.
        config: :class:`QuantConfig` (default: W4 OBS).
        progress: show a tqdm bar (one step per block, or per layer outside blocks).
        inplace: quantize ``model`` itself instead of a deep copy (saves the memory of a copy).

    Every quantized layer becomes a :class:`QuantLinear` / :class:`QuantConv2d`; per-layer OBS
    loss and damping are kept in ``model.adagrow_quant["layers"]``, layers left in float (and
    why) in ``["float"]``, the block list calibrated block by block in ``["blocks"]``, the layers
    this process solved in ``["solved_here"]`` (all of them, except under ``torch.distributed``:
    :mod:`.ranks`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__} (QuantConfig(**your_dict))")
    config = copy.deepcopy(config or QuantConfig()).validate()
    return quantize_model(model if inplace else copy.deepcopy(model), calib, config, progress)


def quantize_model(qmodel: nn.Module, calib: Iterable | Callable[[nn.Module], Any] | None, config: QuantConfig,
                   progress: bool, before_block: Callable[[str], None] | None = None,
                   after_block: Callable[[str], None] | None = None) -> nn.Module:
    """:func:`quantize` in place with a validated ``config``; ``before_block(name)`` runs before
    each block is calibrated (:mod:`.onload` loads the block's weights there), ``after_block(name)``
    once it is quantized if no later step runs it again (:mod:`.onload` writes it out there)."""
    qmodel.eval()
    targets, left = quant_targets(qmodel, config)
    cal = Calibration(calib, qmodel)
    if not cal and config.method == "obs":
        raise ValueError("OBS quantization needs calibration data: calib is empty")
    mask = TokenMask(qmodel)
    try:
        with _calibration_mode(qmodel):
            run, blocks = _quantize(qmodel, targets, left, cal, mask, config, progress, before_block, after_block)
    finally:
        mask.remove()
    qmodel.adagrow_quant = {"config": asdict(config), "layers": run.report, "float": left, "blocks": blocks,
                            "solved_here": run.owners.here}
    guard_save_pretrained(qmodel)
    return qmodel


def _without_blocks(model: nn.Module, blocks: list[str], last: list[Any], cal: Calibration) -> None:
    """One calibration pass with the chain of blocks replaced by its stored last outputs."""
    with blocks_skipped(model, blocks, last):
        cal.run(model)


def _quantize(qmodel: nn.Module, targets: dict[str, nn.Module], left: dict[str, str], cal: Calibration,
              mask: TokenMask, config: QuantConfig, progress: bool,
              before_block: Callable[[str], None] | None,
              after_block: Callable[[str], None] | None) -> tuple[_Run, list[str]]:
    blocks: list[str] = []
    if cal:
        lists = candidates(qmodel, list(targets)) if config.method == "obs" else []
        outside = {n for n in targets if not any(n == b or n.startswith(b + ".") for bl in lists for b in bl)}
        probe = Probe(qmodel, targets, lists, outside)
        probe.run(lambda: cal.run_first(qmodel))
        calls = probe.calls
        unused = [n for n in targets if n not in calls]
        if unused:
            left.update({n: "never called in forward" for n in unused})
            warnings.warn(f"layers never called in forward, left in float: {unused}", stacklevel=4)
        blocks = probe.chain() or []
    else:
        calls = {n: 1 for n in targets}
    order = list(calls)  # forward order of first calls
    inside = [n for n in order if any(n == b or n.startswith(b + ".") for b in blocks)]
    pre = [n for n in order if n not in inside and probe.first_call[n] < probe.blocks[blocks[0]].order] \
        if blocks else []
    post = [n for n in order if n not in inside and n not in pre]
    # layers after the chain calibrated from the last block's outputs, when they depend on nothing else
    replay_tail = bool(blocks and post) and tail_replayable(
        qmodel, blocks, probe.blocks[blocks[-1]].raw, probe.inputs, post, lambda: cal.run_first(qmodel))
    if cal:
        probe.release()
    # the float layers are not needed by name from here on: dropping these references lets a
    # replaced layer's float weights go (quantizing from disk loads them one block at a time)
    targets.clear()
    run = _Run(qmodel, config, mask)
    run.before_block = before_block
    if not post or replay_tail:  # nothing after the chain runs the blocks again
        run.after_block = after_block
    full = lambda: cal.run(qmodel)  # noqa: E731
    stop = lambda n: calls[n] == 1 and cal.loop is None  # noqa: E731
    with tqdm(total=len(pre) + len(blocks) + len(post), desc=f"quantize W{config.bits} {config.method}",
              disable=not progress) as bar:
        for name in pre:
            run.layer(name, full, stop(name))
            bar.update()
        last: list[Any] = []
        if blocks:
            last = _block_by_block(run, blocks, inside, calls, probe.shares_input,
                                   _capture(qmodel, blocks[0], cal, mask), bar)
        for name in post:
            run.layer(name, (lambda: _without_blocks(qmodel, blocks, last, cal)) if replay_tail else full, stop(name))
            bar.update()
    return run, blocks


__all__ = ["QuantConfig", "quantize", "quantize_model", "quant_targets", "input_groups", "DEFAULT_IGNORE"]
