"""OBS (GPTQ-style) layer quantizer with overlap-aware column orders and static groups (docs/design.md §3-4).

``H = 2/n * sum x x^T`` over the layer's input columns (running mean), relative damping with
retries, dead columns, blocked lazy updates with the upper Cholesky factor of ``H^-1``. Hessians
and the solve are float32 by default (as the reference GPTQ; ``tests/test_obs.py`` bounds the
difference to float64 on a layer with outlier channels); ``dtype=torch.float64`` is exact to ~1e-12.
Round-to-nearest (:func:`rtn_quantize`) shares the grid, groups and packing.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from adagrow.packed import column_groups, pack_codes, padded_k

from .grid import check_bits, check_scales, dequantize_codes, quantize_codes
from .groups import check_group_size, group_params, position_groups
from .layer import LayerGeometry, check_parameters, geometry, input_columns, matrix_to_weight, weight_matrix
from .order import check_order, column_overlap, saliency, static_order, tiered_order

DAMP_RETRIES = 4  # lambda is multiplied by 10 up to this many times before giving up
TARGET_DAMP = 1.0  # ridge of the float-target fit, relative to mean(diag H) (measured on MiniLM W4 g128)
FP16_MAX = torch.finfo(torch.float16).max
F32_SAFE = torch.finfo(torch.float32).max / 4  # bound on n * |x|max^2 for float32 statistics


class CalibrationWarning(UserWarning):
    """Calibration data that quantization can handle but that deserves a look (fp16 range, dead groups)."""


@dataclass
class QuantResult:
    """A quantized layer: dequantized weight, packed tensors (docs/design.md §5) and what was used."""

    weight: torch.Tensor               # dequantized, same shape/dtype as layer.weight
    qweight: torch.Tensor              # int32 [K_pad/8, N] (bits <= 4) or [K_pad/4, N]
    scales: torch.Tensor               # [n_groups, N], scale dtype
    zeros: torch.Tensor                # [n_groups, N], integer-valued, scale dtype
    position_group: torch.Tensor | None  # int32 [kh*kw] for "position" / "tier" groups
    perm: torch.Tensor                 # int64 [conv groups, K]: canonical column quantized at each step
    loss: float                        # OBS loss sum_rows ||(W - W_hat) X||^2 / n (nan for RTN)
    damp: float                        # relative damping used (after retries; 0 for RTN)
    bits: int
    group_size: int | str
    sym: bool
    order: str


def _resolve_overlap(layer: nn.Module, geo: LayerGeometry, overlap: torch.Tensor | None,
                     name: str) -> torch.Tensor | None:
    if overlap is None:
        overlap = getattr(layer, "reparam_overlap", None)
    if overlap is None:
        return None
    if geo.kind != "conv":
        raise ValueError(f"{name}: an overlap map applies to Conv2d layers only")
    overlap = torch.as_tensor(overlap).long().cpu()
    if tuple(overlap.shape) != geo.kernel_size or (overlap < 0).any():
        raise ValueError(f"{name}: overlap map must be non-negative with shape {geo.kernel_size}, "
                         f"got shape {tuple(overlap.shape)}")
    return overlap


class _Grouping:
    """Column -> scale-row assignment of one layer for one group_size."""

    def __init__(self, geo: LayerGeometry, group_size: int | str, overlap: torch.Tensor | None):
        self.group_size = group_size
        self.k_pad = padded_k(geo.k, group_size)
        self.position_group = None
        if isinstance(group_size, str):
            ov = overlap if overlap is not None else torch.ones(geo.kernel_size, dtype=torch.int64)
            self.position_group = position_groups(ov, group_size)
        self.gid_pad = column_groups(self.k_pad, group_size, geo.cin_per_group, self.position_group)
        self.gid = self.gid_pad[: geo.k]
        self.n_groups = int(self.gid_pad.max()) + 1


def _finish(layer: nn.Module, geo: LayerGeometry, grouping: _Grouping, codes: torch.Tensor,
            scales: torch.Tensor, zeros: torch.Tensor, scale_dtype: torch.dtype, perm: torch.Tensor,
            loss: float, damp: float, bits: int, sym: bool, order: str) -> QuantResult:
    """Pack codes ``[N, K]`` with per-row group params ``[N, n_groups]`` into a QuantResult."""
    codes = codes.float().cpu()
    scales, zeros = scales.float().cpu(), zeros.float().cpu()
    pad_zero = zeros[:, grouping.gid_pad[geo.k:]]  # padding columns dequantize to exactly 0
    qweight = pack_codes(torch.cat([codes, pad_zero], 1).round().long(), bits)
    w_hat = dequantize_codes(codes, scales[:, grouping.gid], zeros[:, grouping.gid])
    dev = layer.weight.device
    return QuantResult(
        weight=matrix_to_weight(w_hat, geo).to(device=dev, dtype=layer.weight.dtype),
        qweight=qweight.to(dev),
        scales=scales.t().contiguous().to(device=dev, dtype=scale_dtype),
        zeros=zeros.t().contiguous().to(device=dev, dtype=scale_dtype),
        position_group=None if grouping.position_group is None else grouping.position_group.to(dev),
        perm=perm, loss=loss, damp=damp, bits=bits, group_size=grouping.group_size, sym=sym, order=order,
    )


def rtn_quantize(layer: nn.Module, bits: int = 4, group_size: int | str = 128, sym: bool = False,
                 mse: bool = False, overlap: torch.Tensor | None = None,
                 scale_dtype: torch.dtype = torch.float16, name: str = "layer") -> QuantResult:
    """Round-to-nearest on the same grid, groups and packed format as OBS (the baseline)."""
    geo = geometry(layer, name)
    check_bits(bits)
    check_parameters(layer, name)
    group_size = check_group_size(group_size, geo.kind == "conv")
    grouping = _Grouping(geo, group_size, _resolve_overlap(layer, geo, overlap, name))
    w = weight_matrix(layer.weight.detach(), geo).float().cpu()
    s, z = group_params(w, grouping.gid, grouping.n_groups, bits, sym, mse, scale_dtype)
    check_scales(s, w, scale_dtype, name)
    codes = quantize_codes(w, s[:, grouping.gid], z[:, grouping.gid], bits)
    perm = torch.arange(geo.k).repeat(geo.groups, 1)
    return _finish(layer, geo, grouping, codes, s, z, scale_dtype, perm, float("nan"), 0.0, bits, sym, "none")


def _obs_block(w: torch.Tensor, u: torch.Tensor, sc: torch.Tensor, zc: torch.Tensor,
               bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize columns of ``w`` ``[rows, B]`` in order with the upper Cholesky block ``u`` ``[B, B]``.

    Returns codes ``[rows, B]``, scaled errors ``[rows, B]`` for the lazy update, and the OBS loss
    (a 0-d tensor: no host synchronisation per column).
    """
    # columns as contiguous rows: the per-column ops read and write contiguous memory (~1.5x faster)
    wt, sct, zct = w.t().contiguous(), sc.t().contiguous(), zc.t().contiguous()
    codes, errs = torch.empty_like(wt), torch.empty_like(wt)
    for i in range(wt.shape[0]):
        q = quantize_codes(wt[i], sct[i], zct[i], bits)
        err = (wt[i] - dequantize_codes(q, sct[i], zct[i])) / u[i, i]
        wt[i:] -= u[i, i:, None] * err[None, :]
        codes[i], errs[i] = q, err
    return codes.t(), errs.t(), 0.5 * errs.square().sum()


def _upper_factor(hinv: torch.Tensor, perm: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` with rows and columns in ``perm`` order (one K x K buffer)."""
    u = hinv[perm[:, None], perm[None, :]]
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(u, upper=True, out=(u, info))
    if int(info):
        raise RuntimeError(f"{name}: the inverse Hessian is not positive definite in float "
                           f"{str(hinv.dtype)[11:]} (ill-conditioned statistics); raise percdamp or use "
                           "hessian_dtype='float64'")
    return u


def _obs_static(w: torch.Tensor, u: torch.Tensor, perm: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                gid: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's blocked lazy-update loop over a fixed column order with the upper Cholesky factor
    ``u`` of the permuted ``H^-1`` (:func:`_upper_factor`); codes in canonical order. ``s``, ``z``
    ``[rows, n_groups]`` are expanded to columns one block at a time (``gid``: each column's group)."""
    w, gperm = w[:, perm].clone(), gid[perm]
    codes = torch.empty_like(w)
    loss = w.new_zeros(())
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        g = gperm[i1:i2]
        q, err, l = _obs_block(w[:, i1:i2], u[i1:i2, i1:i2], s[:, g], z[:, g], bits)
        codes[:, i1:i2] = q
        loss += l
        w[:, i2:] -= err @ u[i1:i2, i2:]
    del w
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out, loss


def _rounding_error(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, gid: torch.Tensor, bits: int,
                    chunk: int = 512) -> torch.Tensor:
    """``[K]``: each column's summed squared round-to-nearest error, ``chunk`` columns at a time."""
    out = torch.empty(w.shape[1], dtype=w.dtype, device=w.device)
    for c1 in range(0, w.shape[1], chunk):
        g, wc = gid[c1:c1 + chunk], w[:, c1:c1 + chunk]
        sc, zc = s[:, g], z[:, g]
        out[c1:c1 + chunk] = (dequantize_codes(quantize_codes(wc, sc, zc, bits), sc, zc) - wc).square().sum(0)
    return out


def _obs_dynamic(w: torch.Tensor, hinv: torch.Tensor, col_ov: torch.Tensor, sc: torch.Tensor,
                 zc: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reparam-dynamic``: before each block, re-rank the current tier's remaining columns by
    saliency under the updated weights and the inverse Hessian of the remaining columns.

    The remaining inverse Hessian is kept exact by a Schur-complement update after each block.
    Returns codes (canonical order), the order used, and the OBS loss.
    """
    w, hinv = w.clone(), hinv.clone()
    codes = torch.empty_like(w)
    remaining = tiered_order(col_ov.to(w.dtype), torch.zeros(w.shape[1], dtype=w.dtype))
    used, loss = [], w.new_zeros(())
    while remaining.numel():
        tier = col_ov[remaining] == col_ov[remaining[0]]
        cur, later = remaining[tier], remaining[~tier]
        err2 = (dequantize_codes(quantize_codes(w[:, cur], sc[:, cur], zc[:, cur], bits),
                                 sc[:, cur], zc[:, cur]) - w[:, cur]).square()
        cur = cur[torch.argsort(saliency(err2.sum(0), hinv[cur, cur]), descending=True, stable=True)]
        blk, rest = cur[:block], torch.cat([cur[block:], later])
        h_bb = hinv[blk][:, blk]
        u_bb = torch.linalg.cholesky(h_bb, upper=True)
        q, err, l = _obs_block(w[:, blk], u_bb, sc[:, blk], zc[:, blk], bits)
        codes[:, blk] = q
        loss += l
        used.append(blk)
        if rest.numel():
            u_br = torch.linalg.solve_triangular(u_bb.t(), hinv[blk][:, rest], upper=False)
            w[:, rest] -= err @ u_br
            hinv[rest[:, None], rest[None, :]] -= u_br.t() @ u_br
        remaining = rest
    return codes, torch.cat(used), loss


class OBSQuantizer:
    """Second-order quantizer for one ``nn.Linear`` or ``nn.Conv2d`` (grouped / depthwise too).

    Feed the layer's inputs with :meth:`add_batch`, then call :meth:`quantize`.
    """

    def __init__(self, layer: nn.Module, name: str = "layer", dtype: torch.dtype = torch.float32):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name}: OBS dtype must be torch.float32 or torch.float64, got {dtype}")
        self.layer, self.name, self.dtype = layer, name, dtype
        self.geo = geometry(layer, name)
        self.H: torch.Tensor | None = None  # [conv groups, K, K] in ``dtype``
        self.C: torch.Tensor | None = None  # [conv groups, K, K]: 2/n sum x_float x^T (float target)
        self.nsamples = 0
        self._warned_fp16 = False
        self._inverses: dict = {}  # {"H": the H they invert, key: (factor, damping)}, shared like H
        self._weights: list[torch.Tensor] | None = None  # per conv group: the matrix to round (fit_target)

    def share(self, other: "OBSQuantizer") -> None:
        """Use ``other``'s statistics (a layer fed the identical input tensor: q/k/v, gate/up)."""
        if other.geo.k != self.geo.k or other.geo.groups != self.geo.groups:
            raise ValueError(f"{self.name}: cannot share the Hessian of {other.name} (different input columns)")
        self.H, self.C, self.nsamples = other.H, other.C, other.nsamples
        self._inverses = other._inverses

    def _cache(self) -> dict:
        """The factorizations shared with the layers sharing these statistics (emptied when the
        statistics were replaced or updated since they were computed)."""
        if self._inverses.get("H") is not self.H:
            self._inverses.clear()
            self._inverses["H"] = self.H
        return self._inverses

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Accumulate ``H = 2/n sum x x^T`` from the layer input (any batch shape).

        ``target``: the float model's input to this layer for the same samples (same shape as
        ``inp``). With it, ``C = 2/n sum x_float x^T`` is accumulated too and :meth:`quantize` fits
        the float layer's output ``W x_float`` from the quantized prefix's ``x`` (GPTQv2's
        asymmetric calibration), so the layer also corrects the error its inputs already carry;
        give it for every batch or for none. Products and the running mean are in ``dtype``.
        """
        if target is not None and target.shape != inp.shape:
            raise ValueError(f"{self.name}: float-target input has shape {tuple(target.shape)}, "
                             f"the layer input {tuple(inp.shape)}")
        if (target is None) != (self.C is None) and self.nsamples:
            raise ValueError(f"{self.name}: give a float-target input with every calibration batch or with none")
        x = input_columns(inp.detach(), self.geo, self.name)
        n = x.shape[-1]
        if n == 0:
            return
        # one reduction per batch instead of a finiteness check of the K x K products: NaN / inf
        # inputs give a non-finite max, and |x_i x_j| summed over n rows stays below n * amax^2
        amax = float(inp.detach().abs().max())
        if not math.isfinite(amax):
            raise ValueError(f"{self.name}: the layer's calibration inputs contain NaN or inf: the calibration "
                             f"data does, or a layer before {self.name} produces them (overflow or non-finite "
                             "weights)")
        tmax = amax
        if target is not None:
            tmax = float(target.detach().abs().max())
            if not math.isfinite(tmax):
                raise ValueError(f"{self.name}: the float model's inputs to this layer are not finite")
        if self.dtype == torch.float32 and n * amax * max(amax, tmax) > F32_SAFE:
            # products that may overflow float32 (|x| beyond ~1e17): this layer's statistics move to float64
            self.dtype = torch.float64
            if self.H is not None:
                self.H = self.H.double()
                self.C = None if self.C is None else self.C.double()
        x = x.to(self.dtype)
        xx = x @ x.transpose(1, 2)
        if amax > FP16_MAX and not self._warned_fp16:
            self._warned_fp16 = True
            warnings.warn(CalibrationWarning(
                f"{self.name}: calibration inputs reach |x| = {amax:.3g}, beyond the float16 maximum "
                f"{FP16_MAX:.0f}: this layer overflows in fp16 (W4A16 kernels, fp16 ONNX)"), stacklevel=2)
        if self.H is None:
            self.H = torch.zeros(self.geo.groups, self.geo.k, self.geo.k, dtype=self.dtype, device=x.device)
            if target is not None:
                self.C = torch.zeros_like(self.H)
        self._weights = None
        keep = self.nsamples / (self.nsamples + n)
        self.nsamples += n
        self.H.mul_(keep).add_(xx, alpha=2 / self.nsamples)
        if target is not None:
            xf = input_columns(target.detach(), self.geo, self.name).to(self.dtype)
            self.C.mul_(keep).add_(xf @ x.transpose(1, 2), alpha=2 / self.nsamples)

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Under ``torch.distributed`` (more than one rank): replace this rank's statistics by
        those of all ranks' samples together (sample-weighted means of H and C; one fixed-order
        collective per tensor, then rank 0's result broadcast so every rank quantizes the same)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        n = torch.tensor([float(self.nsamples)], dtype=torch.float64)
        dist.all_reduce(n)
        if self.H is None:
            raise RuntimeError(f"{self.name}: this rank saw no calibration input for the layer")
        for key in ("H", "C"):
            t = getattr(self, key)
            if t is not None:
                t = t * (self.nsamples / float(n))
                dist.all_reduce(t)
                dist.broadcast(t, 0)
                setattr(self, key, t)
        self.nsamples = int(n)
        self._weights = None

    def _fit_target(self, w: torch.Tensor, g: int) -> torch.Tensor:
        """``W' = W (C + lam I) (H + lam I)^-1``: the weights whose output on the quantized prefix's
        inputs best matches the float layer's on the float inputs (ridge ``lam`` toward ``W``).
        The Cholesky factor of ``H + lam I`` is computed once for the layers sharing H."""
        cache, key = self._cache(), ("fit", g, w.dtype)
        if key not in cache:
            a = self.H[g].to(w.dtype, copy=True)
            lam = TARGET_DAMP * float(a.diagonal().mean())
            a.diagonal().add_(lam)  # symmetric positive definite (lam > 0): factorized in place
            cache[key] = (torch.linalg.cholesky(a, out=a), lam)
        factor, lam = cache[key]
        rhs = (w @ self.C[g].to(w.dtype)).add_(w, alpha=lam)
        return torch.cholesky_solve(rhs.t(), factor).t()

    @torch.no_grad()
    def fit_target(self) -> None:
        """Compute and keep the matrix :meth:`quantize` rounds: the layer's weight, or with a float
        target (``C``) its fit (:meth:`_fit_target`). Call it for every layer sharing these
        statistics, then :meth:`drop_target` on each, so the float-target statistics are freed
        before the inverse Hessians are formed (docs/scale.md: working set)."""
        if self._weights is not None:
            return
        if self.H is None:
            raise RuntimeError(f"{self.name}: quantize() called before any add_batch(); feed calibration inputs first")
        check_parameters(self.layer, self.name)
        geo, rows = self.geo, self.geo.rows_per_group
        w_all = weight_matrix(self.layer.weight.detach(), geo).to(self.H.device, self.dtype)
        self._weights = []
        for g in range(geo.groups):
            w = w_all[g * rows:(g + 1) * rows].clone()
            if self.C is not None and bool((self.H[g].diagonal() > 0).any()):
                fit = self._fit_target(w, g)
                if not bool(torch.isfinite(fit).all()):  # float32 overflow (weights near its maximum)
                    fit = self._fit_target(w.double(), g)
                w = fit
            self._weights.append(w)

    def drop_target(self) -> None:
        """Free the float-target statistics and factors (after :meth:`fit_target`)."""
        self.C = None
        for key in [k for k in self._inverses if isinstance(k, tuple) and k[0] == "fit"]:
            del self._inverses[key]

    def _inverse(self, g: int | None, dead: torch.Tensor, dtype: torch.dtype,
                 percdamp: float) -> tuple[torch.Tensor, float]:
        """Dampened ``H^-1`` of conv group ``g`` (None: the identity, for a group without inputs;
        dead columns' diagonal set to 1), factorized and inverted in one K x K buffer, and the
        damping used."""
        mean_diag = None
        for attempt in range(DAMP_RETRIES + 1):
            pd = percdamp * 10**attempt
            a = torch.eye(self.geo.k, dtype=dtype, device=self.H.device) if g is None else self.H[g].to(dtype, copy=True)
            a[dead, dead] = 1
            mean_diag = float(a.diagonal().mean()) if mean_diag is None else mean_diag
            a.diagonal().add_(pd * mean_diag)
            info = torch.empty((), dtype=torch.int32)
            torch.linalg.cholesky_ex(a, out=(a, info))
            if int(info) == 0:
                return torch.cholesky_inverse(a, out=a), pd
        raise RuntimeError(f"{self.name}: Hessian is not positive definite even with relative "
                           f"damping {pd:g} ({DAMP_RETRIES} retries); the calibration data may be "
                           "degenerate (too few samples or constant inputs)")

    @torch.no_grad()
    def quantize(self, bits: int = 4, group_size: int | str = 128, sym: bool = False,
                 order: str = "reparam", overlap: torch.Tensor | None = None, percdamp: float = 0.01,
                 block_size: int = 128, mse: bool = False,
                 scale_dtype: torch.dtype = torch.float16) -> QuantResult:
        """Quantize the layer's weight (the layer itself is not modified).

        Args:
            bits: 2..8. group_size: -1, a multiple of 8, "position" or "tier" (conv only).
            order: none | act | reparam | reparam-dynamic (docs/design.md §3).
            overlap: ``[kh, kw]`` overlap map; None reads ``layer.reparam_overlap`` if present.
            percdamp: damping relative to mean(diag H). block_size: lazy-update block (columns).
            mse: search the clipping ratio per group. scale_dtype: float16 or bfloat16.
        """
        geo, name = self.geo, self.name
        check_bits(bits)
        group_size = check_group_size(group_size, geo.kind == "conv")
        check_order(order)
        if not percdamp > 0:
            raise ValueError(f"percdamp must be > 0, got {percdamp}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.fit_target()
        cache = self._cache()
        dead_groups = [g for g in range(geo.groups) if not bool((self.H[g].diagonal() > 0).any())]
        if len(dead_groups) == geo.groups:
            raise ValueError(f"{name}: every calibration input of this layer is zero ({self.nsamples} samples), "
                             "so OBS would zero all its weights; check the calibration data, or quantize this "
                             "layer with method='rtn' or skip it")
        if self.nsamples < geo.k:
            warnings.warn(CalibrationWarning(
                f"{name}: {self.nsamples} calibration rows (tokens / output positions) for {geo.k} input columns: "
                "the Hessian cannot be full rank, so OBS leans on its damping; calibrate with at least "
                f"{geo.k} tokens / positions"), stacklevel=2)
        if dead_groups:
            warnings.warn(CalibrationWarning(
                f"{name}: conv groups {dead_groups[:8]}{'...' if len(dead_groups) > 8 else ''} saw only zero "
                "inputs in calibration; their weights are rounded to nearest instead of zeroed"), stacklevel=2)
        overlap = _resolve_overlap(self.layer, geo, overlap, name)
        grouping = _Grouping(geo, group_size, overlap)
        col_ov = column_overlap(overlap, geo.k, geo.cin_per_group)
        gid = grouping.gid.to(self.H.device)
        rows = geo.rows_per_group
        codes = torch.empty(geo.out_features, geo.k, dtype=self.dtype, device=self.H.device)
        scales = torch.empty(geo.out_features, grouping.n_groups)
        zeros = torch.empty_like(scales)
        perms, loss, damp = [], 0.0, percdamp
        for g in range(geo.groups):
            w = self._weights[g]
            # a group without any input keeps its weights: identity Hessian = round to nearest
            diag = torch.ones(geo.k, dtype=w.dtype, device=w.device) if g in dead_groups \
                else self.H[g].diagonal().to(w.dtype)
            dead = diag == 0
            diag = diag.masked_fill(dead, 1)
            if bool(dead.any()):
                w = w.clone()
                w[:, dead] = 0
            s, z = group_params(w.float().cpu(), grouping.gid, grouping.n_groups, bits, sym, mse, scale_dtype)
            check_scales(s, w, scale_dtype, name)
            scales[g * rows:(g + 1) * rows], zeros[g * rows:(g + 1) * rows] = s, z
            s, z = s.to(w), z.to(w)
            key = (self.nsamples, g, percdamp, w.dtype)
            if key not in cache:  # q/k/v, gate/up: one inverse for the group
                cache[key] = self._inverse(None if g in dead_groups else g, dead, w.dtype, percdamp)
            hinv, pd = cache[key]
            damp = max(damp, pd)
            if order == "reparam-dynamic":
                q, perm, l = _obs_dynamic(w, hinv, col_ov.to(w.device), s[:, gid], z[:, gid], bits, block_size)
            else:
                sal = None
                if order == "reparam":
                    sal = saliency(_rounding_error(w, s, z, gid, bits), hinv.diagonal())
                perm = static_order(order, diag, col_ov.to(w.device), sal)
                q, l = _obs_static(w, _upper_factor(hinv, perm, name), perm, s, z, gid, bits, block_size)
            codes[g * rows:(g + 1) * rows] = q.to(codes.dtype)
            perms.append(perm.cpu())
            loss += l
        return _finish(self.layer, geo, grouping, codes, scales, zeros, scale_dtype, torch.stack(perms),
                       float(loss), damp, bits, sym, order)
