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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adagrow.checks import all_finite
from adagrow.packed import codes_per_word, column_groups, pack_codes, padded_k

from .grid import MIN_SCALE, check_bits, check_scales, dequantize_codes, grid_params, quantize_codes
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
    bias: torch.Tensor | None = None   # [N]: the refitted bias (centred statistics), None: the layer's


GRAM_BLOCKS = 8  # row blocks of the symmetric H update: 9/16 of the full product's multiply-adds
CALLER = 3  # the stacklevel of a warning in a torch.no_grad method: past the decorator's frame, at its caller


def _add_gram_(h: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
    """``h <- beta h + alpha x x^T`` in place for symmetric ``h`` ``[G, K, K]`` and ``x`` ``[G, K, n]``,
    no K x K temporary: each of :data:`GRAM_BLOCKS` row blocks is multiplied from its diagonal
    block rightwards and its lower part mirrored from the upper, so about half the products of one
    ``baddbmm`` are computed (0.62x its time at K = 1536 on one CPU thread)."""
    k = h.shape[-1]
    b = -(-k // GRAM_BLOCKS)
    if k < 2 * GRAM_BLOCKS:
        h.baddbmm_(x, x.transpose(1, 2), beta=beta, alpha=alpha)
        return
    for i in range(0, k, b):
        h[:, i:i + b, i:].baddbmm_(x[:, i:i + b], x[:, i:].transpose(1, 2), beta=beta, alpha=alpha)
        h[:, i + b:, i:i + b] = h[:, i:i + b, i + b:].transpose(1, 2)


def folds_target(layer: nn.Module, name: str = "layer") -> bool:
    """Whether a layer's float-target statistics can be folded (``OBSQuantizer(fold_target=True)``):
    one conv group and at most half as many outputs as input columns."""
    geo = geometry(layer, name)
    return geo.groups == 1 and 2 * geo.out_features <= geo.k


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
            loss: float, damp: float, bits: int, sym: bool, order: str, rows: int = 256) -> QuantResult:
    """Pack codes ``[N, K]`` (integer-valued, any dtype) with per-row group params ``[N, n_groups]``
    into a QuantResult, ``rows`` output rows at a time (no full-size float or int64 temporaries)."""
    codes = codes.cpu()
    scales, zeros = scales.float().cpu(), zeros.float().cpu()
    pad_gid = grouping.gid_pad[geo.k:]  # padding columns dequantize to exactly 0
    n = codes.shape[0]
    qweight = torch.empty(grouping.k_pad // codes_per_word(bits), n, dtype=torch.int32)
    w_hat = torch.empty(n, geo.k, dtype=layer.weight.dtype)
    for r1 in range(0, n, rows):
        r2 = min(r1 + rows, n)
        c, s, z = codes[r1:r2].float(), scales[r1:r2], zeros[r1:r2]
        qweight[:, r1:r2] = pack_codes(torch.cat([c, z[:, pad_gid]], 1).round().long(), bits)
        w_hat[r1:r2] = dequantize_codes(c, s[:, grouping.gid], z[:, grouping.gid])
    dev = layer.weight.device
    return QuantResult(
        weight=matrix_to_weight(w_hat, geo).to(dev),
        qweight=qweight.to(dev),
        scales=scales.t().contiguous().to(device=dev, dtype=scale_dtype),
        zeros=zeros.t().contiguous().to(device=dev, dtype=scale_dtype),
        position_group=None if grouping.position_group is None else grouping.position_group.to(dev),
        perm=perm, loss=loss, damp=damp, bits=bits, group_size=grouping.group_size, sym=sym, order=order,
    )


def rtn_quantize(layer: nn.Module, bits: int = 4, group_size: int | str = 128, sym: bool = False,
                 mse: bool = False, overlap: torch.Tensor | None = None,
                 scale_dtype: torch.dtype = torch.float16, name: str = "layer",
                 sym_grid: str = "signed") -> QuantResult:
    """Round-to-nearest on the same grid, groups and packed format as OBS (the baseline)."""
    geo = geometry(layer, name)
    check_bits(bits)
    check_parameters(layer, name)
    group_size = check_group_size(group_size, geo.kind == "conv")
    grouping = _Grouping(geo, group_size, _resolve_overlap(layer, geo, overlap, name))
    w = weight_matrix(layer.weight.detach(), geo).float().cpu()
    s, z = group_params(w, grouping.gid, grouping.n_groups, bits, sym, mse, scale_dtype, sym_grid)
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
    # columns as contiguous rows: the per-column ops read and write contiguous memory (~1.5x faster);
    # quantize_codes / dequantize_codes written out in place into the outputs' rows, the diagonal
    # read once (the same operations in the same order: bit-identical, ~10% faster)
    wt, sct, zct = w.t().contiguous(), sc.t().contiguous(), zc.t().contiguous()
    codes, errs = torch.empty_like(wt), torch.empty_like(wt)
    diag, top = u.diagonal().tolist(), 2**bits - 1
    for i in range(wt.shape[0]):
        q, err, col = codes[i], errs[i], wt[i]
        torch.div(col, sct[i], out=q).round_().add_(zct[i]).clamp_(0, top)
        torch.sub(q, zct[i], out=err).mul_(sct[i])
        torch.sub(col, err, out=err).div_(diag[i])
        wt[i + 1:] -= u[i, i + 1:, None] * err
    return codes.t(), errs.t(), 0.5 * errs.square().sum()


def _cholesky_in_place(a: torch.Tensor, upper: bool = False) -> tuple[torch.Tensor, int]:
    """Cholesky factor of the symmetric matrix ``a`` in ``a``'s own buffer, and LAPACK's info.

    Factorized through the column-major view ``a.mT`` (equal to ``a``, being symmetric), which
    LAPACK takes as it is: a row-major matrix is first copied (one more K x K buffer, measured).
    The factor returned is that view."""
    f = a.mT
    info = torch.empty((), dtype=torch.int32, device=a.device)
    torch.linalg.cholesky_ex(f, upper=upper, out=(f, info))
    return f, int(info)


def _upper_factor(hinv: torch.Tensor, perm: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` with rows and columns in ``perm`` order (one K x K buffer)."""
    u, info = _cholesky_in_place(hinv[perm[:, None], perm[None, :]], upper=True)
    if info:
        raise RuntimeError(f"{name}: the inverse Hessian is not positive definite in float "
                           f"{str(hinv.dtype)[11:]} (ill-conditioned statistics); raise percdamp or use "
                           "hessian_dtype='float64'")
    return u


GroupParams = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _obs_static(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, z: torch.Tensor, gid: torch.Tensor,
                bits: int, block: int, params: GroupParams | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's blocked lazy-update loop over the columns of ``w`` in their given order (the
    permuted weight matrix, overwritten: each block's columns by their codes once quantized)
    with the upper Cholesky factor ``u`` of ``H^-1`` in the same order (:func:`_upper_factor`).
    ``s``, ``z`` ``[rows, n_groups]`` are expanded to columns one block at a time (``gid``: each
    column's group). ``params`` (dynamic groups): ``s`` and ``z`` are filled here instead, a
    group's from ``params(its columns)`` when a block first reaches one of its columns, so from
    the weights as OBS updated them up to that block (the reference GPTQ's groups, which read the
    weights at the block's start too). Returns the codes (in ``w``'s column order) and the OBS loss."""
    loss = w.new_zeros(())
    done = torch.zeros(s.shape[1], dtype=torch.bool)
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        g = gid[i1:i2]
        if params is not None:
            for grp in g.unique().tolist():
                if not done[grp]:
                    done[grp] = True
                    cols = (gid == grp).nonzero().squeeze(1)  # all at or after i1: first reached here
                    s[:, grp], z[:, grp] = params(w[:, cols])
        q, err, l = _obs_block(w[:, i1:i2], u[i1:i2, i1:i2], s[:, g], z[:, g], bits)
        loss += l
        w[:, i2:] -= err @ u[i1:i2, i2:]
        w[:, i1:i2] = q  # the block's columns are not read again
    return w, loss


def _coordinate_descent(target: torch.Tensor, codes: torch.Tensor, sc: torch.Tensor, zc: torch.Tensor,
                        hd: torch.Tensor, order: torch.Tensor, bits: int, passes: int,
                        block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower ``(target - w_hat) hd (target - w_hat)^T`` by ``passes`` sweeps of exact coordinate
    descent over the columns (in ``order``), each column moved to the grid point nearest its best
    value given all the others (QuantEase): the loss never rises. ``target`` ``[rows, K]`` the matrix
    rounded, ``codes`` ``[rows, K]`` float codes from OBS (updated in place), ``sc``, ``zc`` ``[rows, K]``
    each column's scale and zero point, ``hd`` ``[K, K]`` the damped H OBS used. Updates of the
    residual ``(target - w_hat) hd`` are lazy over ``block`` columns. Returns the codes and the loss change."""
    top = 2**bits - 1
    w_hat = dequantize_codes(codes, sc, zc)
    r = (target - w_hat) @ hd
    before = 0.5 * ((target - w_hat) * r).sum()
    diag = hd.diagonal()
    for _ in range(passes):
        for i1 in range(0, order.numel(), block):
            cols = order[i1:i1 + block]
            h_blk = hd[cols]  # [B, K]
            r_blk = r[:, cols]  # local residual of the block's columns
            start = w_hat[:, cols].clone()
            for j, c in enumerate(cols.tolist()):
                best = w_hat[:, c] + r_blk[:, j] / diag[c]
                q = torch.div(best, sc[:, c]).round_().add_(zc[:, c]).clamp_(0, top)
                new = (q - zc[:, c]) * sc[:, c]
                delta = new - w_hat[:, c]
                codes[:, c], w_hat[:, c] = q, new
                r_blk -= delta[:, None] * h_blk[j, cols][None, :]
            r -= (w_hat[:, cols] - start) @ h_blk
    after = 0.5 * ((target - w_hat) * ((target - w_hat) @ hd)).sum()
    return codes, after - before


def _rounding_error(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, gid: torch.Tensor, bits: int,
                    chunk: int = 512) -> torch.Tensor:
    """``[K]``: each column's summed squared round-to-nearest error, ``chunk`` columns at a time."""
    out = torch.empty(w.shape[1], dtype=w.dtype, device=w.device)
    for c1 in range(0, w.shape[1], chunk):
        g, wc = gid[c1:c1 + chunk], w[:, c1:c1 + chunk]
        sc, zc = s[:, g], z[:, g]
        out[c1:c1 + chunk] = (dequantize_codes(quantize_codes(wc, sc, zc, bits), sc, zc) - wc).square().sum(0)
    return out


def _refit_scales(d: torch.Tensor, s: torch.Tensor, gid: torch.Tensor, h: torch.Tensor, wh: torch.Tensor,
                  scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scales for fixed codes: ``d`` ``[rows, K]`` the codes minus their zero points,
    ``s`` ``[rows, n_groups]`` the scales used, ``h`` ``[K, K]`` the layer's H and ``wh = W H`` for
    the weights ``W`` being quantized. Each row's ``w_hat = sum_g s_g d_g`` (``d_g``: ``d`` on group
    ``g``'s columns) is quadratic in its scales, so the scales minimising ``(w - w_hat) H (w - w_hat)^T``
    solve ``M s = c``, ``M_gh = d_g H d_h^T``, ``c_g = d_g H w^T`` (one ``[rows, K] x [K, K]`` product's
    work in all). They are rounded to ``scale_dtype``; a row keeps ``s`` where the rounded ones are not
    lower, change sign or vanish. Returns the scales and the change of the OBS loss (<= 0)."""
    rows, n_groups = s.shape
    onehot = torch.nn.functional.one_hot(gid.long(), n_groups).to(d)  # [K, n_groups]: sums over a group's columns
    m = torch.zeros(rows, n_groups, n_groups, dtype=torch.float64, device=d.device)
    for g in range(n_groups):
        cols = (gid == g).nonzero().squeeze(1)
        if cols.numel():
            m[:, g] = (((d[:, cols] @ h[cols]).mul_(d)) @ onehot).double()  # sum over group h of d_g H d
    c = ((d * wh) @ onehot).double()
    used = m.diagonal(dim1=1, dim2=2) > 0  # groups whose codes are all on the zero point: any scale
    ridge = torch.where(used, 1e-9 * m.diagonal(dim1=1, dim2=2), torch.ones_like(c))
    new = torch.linalg.solve(m + torch.diag_embed(ridge), c).to(scale_dtype).double()
    old = s.double()
    ok = torch.isfinite(new) & (torch.sign(new) == torch.sign(old)) & (new.abs() >= MIN_SCALE) | ~used
    new = torch.where(ok & used, new, old)
    f = lambda x: (x[:, None, :] @ m @ x[:, :, None]).view(rows) - 2 * (c * x).sum(1)  # noqa: E731
    better = f(new) < f(old)
    new = torch.where(better[:, None], new, old)
    return new.to(s.dtype), 0.5 * (f(new) - f(old)).sum().to(s.dtype)


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
    ``fold_target``: keep the float-target statistics as ``W C`` (``[out, K]``, from ``(W x_float) x^T``
    per batch, or from the float layer's outputs given to :meth:`add_batch` as ``float_out``) instead
    of ``C`` (``[K, K]``) where that is less work: a layer with at most half as many outputs as
    inputs (:func:`folds_target`; an MLP's down projection: half the products at 4x expansion, a
    quarter from the outputs). Only for a quantizer whose statistics no other layer shares
    (:meth:`share` refuses them).
    """

    def __init__(self, layer: nn.Module, name: str = "layer", dtype: torch.dtype = torch.float32,
                 target_damp: float = TARGET_DAMP, fold_target: bool = False):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name}: OBS dtype must be torch.float32 or torch.float64, got {dtype}")
        if not target_damp > 0:
            raise ValueError(f"{name}: target_damp must be > 0, got {target_damp}")
        self.layer, self.name, self.dtype, self.target_damp = layer, name, dtype, target_damp
        self.geo = geometry(layer, name)
        self.fold = fold_target and folds_target(layer, name)
        self.H: torch.Tensor | None = None  # [conv groups, K, K] in ``dtype``
        # [conv groups, K, K]: 2/n sum x_float x^T (float target); folded: [1, out, K], W C
        self.C: torch.Tensor | None = None
        self.mu: torch.Tensor | None = None  # [conv groups, K]: mean input column
        self.mu_f: torch.Tensor | None = None  # [conv groups, K]: mean float-target input; folded: [1, out], W x
        self.centered = False
        self.nsamples = 0
        self._warned_fp16 = False
        self._inverses: dict = {}  # {"H": the H they invert, key: (factor, damping)}, shared like H
        self._weights: list[torch.Tensor] | None = None  # per conv group: the matrix to round (fit_target)

    def share(self, other: "OBSQuantizer") -> None:
        """Use ``other``'s statistics (a layer fed the identical input tensor: q/k/v, gate/up)."""
        if other.geo.k != self.geo.k or other.geo.groups != self.geo.groups:
            raise ValueError(f"{self.name}: cannot share the Hessian of {other.name} (different input columns)")
        if other.fold:
            raise ValueError(f"{self.name}: cannot share the statistics of {other.name}: its float-target "
                             "statistics are folded into its own weights (fold_target)")
        self.H, self.C, self.nsamples = other.H, other.C, other.nsamples
        self.mu, self.mu_f, self.centered = other.mu, other.mu_f, other.centered
        self._inverses = other._inverses

    def _cache(self) -> dict:
        """The factorizations shared with the layers sharing these statistics (emptied when the
        statistics were replaced or updated since they were computed)."""
        if self._inverses.get("H") is not self.H:
            self._inverses.clear()
            self._inverses["H"] = self.H
        return self._inverses

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, target: torch.Tensor | None = None,
                  float_out: torch.Tensor | None = None) -> None:
        """Accumulate ``H = 2/n sum x x^T`` from the layer input (any batch shape).

        ``target``: the float model's input to this layer for the same samples (same shape as
        ``inp``). With it, ``C = 2/n sum x_float x^T`` is accumulated too and :meth:`quantize` fits
        the float layer's output ``W x_float`` from the quantized prefix's ``x`` (GPTQv2's
        asymmetric calibration), so the layer also corrects the error its inputs already carry;
        give it for every batch or for none. Products and the running mean are in ``dtype``.
        ``float_out`` (a folded Linear, :attr:`fold`, instead of ``target``): the float layer's
        output less its bias, ``W x_float`` ``[..., out]`` for the same rows as ``inp``.
        """
        if self.centered:
            raise RuntimeError(f"{self.name}: add_batch() after center(): the statistics are final")
        if target is not None and target.shape != inp.shape:
            raise ValueError(f"{self.name}: float-target input has shape {tuple(target.shape)}, "
                             f"the layer input {tuple(inp.shape)}")
        if float_out is not None:
            if target is not None or not self.fold or self.geo.kind != "linear":
                raise ValueError(f"{self.name}: float_out is for a folded Linear (fold_target), instead of target")
            if float_out.shape != (*inp.shape[:-1], self.geo.out_features):
                raise ValueError(f"{self.name}: float_out has shape {tuple(float_out.shape)}, expected "
                                 f"{(*inp.shape[:-1], self.geo.out_features)}")
            target = float_out
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
            if self.fold and float_out is None:  # products (W x_float) x^T: |W x_float| <= K max|W| max|x_float|
                tmax *= max(1.0, self.geo.k * float(self.layer.weight.detach().abs().max()))
        if self.dtype == torch.float32 and n * amax * max(amax, tmax) > F32_SAFE:
            # products that may overflow float32 (|x| beyond ~1e17): this layer's statistics move to float64
            self.dtype = torch.float64
            if self.H is not None:
                self.H, self.mu = self.H.double(), self.mu.double()
                self.C = None if self.C is None else self.C.double()
                self.mu_f = None if self.mu_f is None else self.mu_f.double()
        x = x.to(self.dtype)
        if amax > FP16_MAX and not self._warned_fp16:
            self._warned_fp16 = True
            warnings.warn(CalibrationWarning(
                f"{self.name}: calibration inputs reach |x| = {amax:.3g}, beyond the float16 maximum "
                f"{FP16_MAX:.0f}: this layer overflows in fp16 (W4A16 kernels, fp16 ONNX)"), stacklevel=CALLER)
        if self.H is None:
            self.H = torch.zeros(self.geo.groups, self.geo.k, self.geo.k, dtype=self.dtype, device=x.device)
            self.mu = torch.zeros(self.geo.groups, self.geo.k, dtype=self.dtype, device=x.device)
            if target is not None:
                rows = self.geo.out_features if self.fold else self.geo.k
                self.C = torch.zeros(self.geo.groups, rows, self.geo.k, dtype=self.dtype, device=x.device)
                self.mu_f = torch.zeros(self.geo.groups, rows, dtype=self.dtype, device=x.device)
        self._weights = None
        keep = self.nsamples / (self.nsamples + n)
        self.nsamples += n
        _add_gram_(self.H, x, keep, 2 / self.nsamples)  # H <- keep H + 2/n x x^T
        self.mu.mul_(keep).add_(x.sum(-1), alpha=1 / self.nsamples)
        if target is not None:
            if float_out is not None:
                xf = float_out.detach().reshape(-1, self.geo.out_features).t()[None].to(self.dtype)
            else:
                xf = input_columns(target.detach(), self.geo, self.name).to(self.dtype)
                if self.fold:
                    xf = self._fold_weight(xf) @ xf  # [1, out, n]: the float layer's outputs less its bias
            self.mu_f.mul_(keep).add_(xf.sum(-1), alpha=1 / self.nsamples)
            self.C.baddbmm_(xf, x.transpose(1, 2), beta=keep, alpha=2 / self.nsamples)

    def _fold_weight(self, like: torch.Tensor) -> torch.Tensor:
        """The layer's weight ``[out, K]`` in ``like``'s dtype and device (folded float target)."""
        return weight_matrix(self.layer.weight.detach(), self.geo).to(like.device, like.dtype)

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
        for key in ("H", "C", "mu", "mu_f"):
            t = getattr(self, key)
            if t is not None:
                t = t * (self.nsamples / float(n))
                dist.all_reduce(t)
                dist.broadcast(t, 0)
                setattr(self, key, t)
        self.nsamples = int(n)
        self._weights = None

    @torch.no_grad()
    def center(self) -> None:
        """Make the statistics those of a layer whose bias is refitted after quantization:
        ``H <- H - 2 mu mu^T`` (the input covariance) and ``C <- C - 2 mu_f mu^T``, so OBS spends
        no precision on the mean input, which :meth:`quantize` then absorbs in the bias
        (``b + W mu_f - W_hat mu``: the layer's mean output on the calibration data is the float
        layer's). Call it after the last :meth:`add_batch` (and :meth:`all_reduce`), before
        :meth:`share`; only for layers with a bias."""
        if self.H is None:
            raise RuntimeError(f"{self.name}: center() called before any add_batch()")
        if self.layer.bias is None:
            raise ValueError(f"{self.name}: center() needs a layer with a bias to absorb the mean")
        if self.nsamples < 2:  # no covariance: every column would read as dead and be zeroed
            warnings.warn(CalibrationWarning(
                f"{self.name}: one calibration row, so no input covariance: the statistics are not centred "
                "and the float bias is kept"), stacklevel=CALLER)
            return
        if not self.centered:
            self.H.baddbmm_(self.mu[:, :, None], self.mu[:, None, :], alpha=-2)
            if self.C is not None:
                self.C.baddbmm_(self.mu_f[:, :, None], self.mu[:, None, :], alpha=-2)  # folded: (W mu_f) mu^T
            self.centered = True
            self._inverses.clear()
            self._weights = None

    def _refit_bias(self, w_hat: torch.Tensor, mu: torch.Tensor, mu_f: torch.Tensor | None) -> torch.Tensor:
        """``b + W mu_f - W_hat mu`` per conv group (``mu_f``: ``mu`` without a float target; folded:
        ``W mu_f`` already), in the bias's dtype: the quantized layer's mean output on the calibration
        inputs equals the float one's."""
        rows = self.geo.rows_per_group
        w = weight_matrix(self.layer.weight.detach(), self.geo)
        w_hat = weight_matrix(w_hat, self.geo)
        bias = self.layer.bias.detach().clone()
        for g in range(self.geo.groups):
            r = slice(g * rows, (g + 1) * rows)
            if mu_f is not None and self.fold:
                float_mean = mu_f[g]
            else:
                float_mean = w[r].to(mu) @ (mu[g] if mu_f is None else mu_f[g])
            shift = float_mean - w_hat[r].to(mu) @ mu[g]
            bias[r] += shift.to(bias)
        return bias

    def _target_lam(self, g: int, dtype: torch.dtype) -> float:
        """Ridge of the float-target fit: ``target_damp`` x mean(diag H) in ``dtype``."""
        return self.target_damp * float(self.H[g].diagonal().to(dtype).mean())

    def _fit_factor(self, g: int, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
        """Lower Cholesky factor of ``H + lam I`` and ``lam`` (computed once for the layers sharing H)."""
        cache, key = self._cache(), ("fit", g, dtype)
        if key not in cache:
            a, lam = self.H[g].to(dtype, copy=True), self._target_lam(g, dtype)
            a.diagonal().add_(lam)  # symmetric positive definite (lam > 0)
            cache[key] = (_cholesky_in_place(a)[0], lam)
        return cache[key]

    def _target_rhs(self, w: torch.Tensor, g: int, rows: int = 256) -> torch.Tensor:
        """``W (C + lam I)``, the right-hand side of the float-target fit, for the rows ``w`` of
        conv group ``g`` (any dtype: converted ``rows`` rows at a time, so a half-precision
        weight is never copied whole; folded statistics hold ``W C`` already, for ``w`` the
        layer's weight). In ``w``'s dtype when floating point of at least the statistics'
        precision, else in theirs; float64 when float32 overflows."""
        dtype = w.dtype if w.dtype.itemsize >= self.dtype.itemsize else self.dtype
        lam = self._target_lam(g, dtype)
        c = self.C[g].to(dtype)
        rhs = torch.empty(w.shape, dtype=dtype, device=c.device)
        for r1 in range(0, w.shape[0], rows):
            wr = w[r1:r1 + rows].to(c.device, dtype)
            rhs[r1:r1 + rows] = torch.add(c[r1:r1 + rows], wr, alpha=lam) if self.fold \
                else (wr @ c).add_(wr, alpha=lam)
        if dtype == torch.float32 and not all_finite(rhs):  # weights near the float32 maximum
            del rhs
            return self._target_rhs(w.double(), g, rows)
        return rhs

    def _solve_target(self, rhs: torch.Tensor, g: int) -> torch.Tensor:
        """``rhs (H + lam I)^-1``, solved in place of ``rhs`` (two triangular solves with the
        Cholesky factor of ``H + lam I``, as ``cholesky_solve``, without its copy of ``rhs``)."""
        factor = self._fit_factor(g, rhs.dtype)[0]
        b = rhs.t()
        torch.linalg.solve_triangular(factor, b, upper=False, out=b)
        torch.linalg.solve_triangular(factor.mT, b, upper=True, out=b)
        if not all_finite(rhs):
            raise RuntimeError(f"{self.name}: the float-target fit overflows float {str(rhs.dtype)[11:]} "
                               "(weights near its maximum); use hessian_dtype='float64' or float_target=False")
        return rhs

    def _fit_target(self, w: torch.Tensor, g: int) -> torch.Tensor:
        """``W' = W (C + lam I) (H + lam I)^-1``: the weights whose output on the quantized prefix's
        inputs best matches the float layer's on the float inputs (ridge ``lam`` toward ``W``)."""
        return self._solve_target(self._target_rhs(w, g), g)

    def _rows(self, g: int) -> torch.Tensor:
        """The layer's weight rows of conv group ``g`` as a ``[rows, K]`` matrix (the layer's dtype;
        a view of the weight for a Linear)."""
        if self.H is None:
            raise RuntimeError(f"{self.name}: quantize() called before any add_batch(); feed calibration inputs first")
        check_parameters(self.layer, self.name)
        rows = self.geo.rows_per_group
        return weight_matrix(self.layer.weight.detach(), self.geo)[g * rows:(g + 1) * rows]

    def _fitted(self, g: int) -> bool:
        """Whether conv group ``g`` has a float-target fit (``C`` held and the group saw inputs)."""
        return self.C is not None and bool((self.H[g].diagonal() > 0).any())

    def _target(self, g: int) -> torch.Tensor:
        """Conv group ``g``'s matrix to round, owned (never the layer's storage), before any solve:
        the float-target fit's right-hand side when :meth:`_fitted`, else the weight in the
        statistics' dtype."""
        w = self._rows(g)
        return self._target_rhs(w, g) if self._fitted(g) else w.to(self.H.device, self.dtype, copy=True)

    def _unsolved(self) -> list[tuple[bool, torch.Tensor]]:
        """Per conv group: whether it is :meth:`_fitted`, and its :meth:`_target` before any solve."""
        return [(self._fitted(g), self._target(g)) for g in range(self.geo.groups)]

    def _solved(self, unsolved: list[tuple[bool, torch.Tensor]]) -> list[torch.Tensor]:
        """The matrices to round from :meth:`_unsolved`'s: the fitted groups' solved in place."""
        return [self._solve_target(m, g) if fitted else m for g, (fitted, m) in enumerate(unsolved)]

    @torch.no_grad()
    def fit_target(self) -> None:
        """Compute and keep the matrix :meth:`quantize` rounds: the layer's weight, or with a float
        target (``C``) its fit (:meth:`_fit_target`). Layers sharing statistics: use
        :func:`fit_targets`, which frees the float-target statistics as it goes."""
        if self._weights is None:
            self._weights = self._solved(self._unsolved())

    def release(self) -> None:
        """Drop this quantizer's statistics, fitted weights and its reference to the inverses it
        shares (freed once no quantizer sharing them holds them). It cannot quantize afterwards."""
        self.H = self.C = self.mu = self.mu_f = None
        self._weights = None
        self._inverses = {}

    def _damped(self, h: torch.Tensor | None, dead: torch.Tensor, dtype: torch.dtype, pd: float) -> torch.Tensor:
        """The matrix OBS inverts, a new K x K buffer in ``dtype``: ``h`` (one conv group's H; None: the
        identity, for a group without inputs) with dead columns' diagonal set to 1, plus ``pd`` x its
        mean diagonal."""
        a = torch.eye(self.geo.k, dtype=dtype, device=dead.device) if h is None else h.to(dtype, copy=True)
        a[dead, dead] = 1
        a.diagonal().add_(pd * float(a.diagonal().mean()))
        return a

    def _inverse(self, h: torch.Tensor | None, dead: torch.Tensor, dtype: torch.dtype,
                 percdamp: float) -> tuple[torch.Tensor, float]:
        """Inverse of :meth:`_damped` ``h``, factorized and inverted in that one K x K buffer, and the
        damping used (raised tenfold on failure, :data:`DAMP_RETRIES` times)."""
        for attempt in range(DAMP_RETRIES + 1):
            pd = percdamp * 10**attempt
            a = self._damped(h, dead, dtype, pd)
            f, info = _cholesky_in_place(a)
            if info == 0:
                torch.cholesky_inverse(f, out=f)  # in place on the column-major factor
                return a, pd  # the same (exactly symmetric) matrix row-major: gathers from it are ~5x faster
        raise RuntimeError(f"{self.name}: Hessian is not positive definite even with relative "
                           f"damping {pd:g} ({DAMP_RETRIES} retries); the calibration data may be "
                           "degenerate (too few samples or constant inputs)")

    def _group_params(self, bits: int, sym: bool, mse: bool, scale_dtype: torch.dtype,
                      sym_grid: str) -> GroupParams:
        """Dynamic groups: one group's ``(scale, zero)`` per row from its current columns ``[rows, n]``
        (rounded to ``scale_dtype``, checked for overflow), in the columns' dtype and device."""
        def params(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            sc, zc = grid_params(cols.float().cpu(), bits, sym, mse, scale_dtype, sym_grid=sym_grid)
            check_scales(sc, cols, scale_dtype, self.name)
            return sc.to(cols), zc.to(cols)
        return params

    @torch.no_grad()
    def quantize(self, bits: int = 4, group_size: int | str = 128, sym: bool = False,
                 order: str = "reparam", overlap: torch.Tensor | None = None, percdamp: float = 0.01,
                 block_size: int = 128, mse: bool = False,
                 scale_dtype: torch.dtype = torch.float16, release: bool = False,
                 sym_grid: str = "signed", groups: str = "static", refit: bool = False,
                 passes: int = 0) -> QuantResult:
        """Quantize the layer's weight (the layer itself is not modified).

        Args:
            bits: 2..8. group_size: -1, a multiple of 8, "position" or "tier" (conv only).
            order: none | act | reparam | reparam-dynamic (docs/design.md §3).
            overlap: ``[kh, kw]`` overlap map; None reads ``layer.reparam_overlap`` if present.
            percdamp: damping relative to mean(diag H). block_size: lazy-update block (columns).
            mse: search the clipping ratio per group. scale_dtype: float16 or bfloat16.
            release: the last use of these statistics by this quantizer and those sharing them
                (the others released already, :meth:`release`): H, its inverse and the fitted
                weight are freed as soon as they are used, the OBS working set of one layer
                being then at most two K x K buffers (docs/scale.md).
            sym_grid: "signed" (all 2^bits codes) or "restricted" (symmetric grids; adagrow.compress.grid).
            groups: "static" (each group's scale and zero point from the weights before OBS) or
                "dynamic" (from the weights OBS has updated when it first reaches the group, as the
                reference GPTQ; not with order "reparam-dynamic"); docs/design.md §3.
            refit: once the codes are chosen, replace each row's scales by those that minimise the
                layer objective ``(w - w_hat) H (w - w_hat)^T`` for those codes and zero points
                (:func:`_refit_scales`; a row keeps its scales where that is not lower after rounding).
            passes: sweeps of coordinate descent after OBS (:func:`_coordinate_descent`; 0: none).
        """
        geo, name = self.geo, self.name
        check_bits(bits)
        group_size = check_group_size(group_size, geo.kind == "conv")
        check_order(order)
        if not percdamp > 0:
            raise ValueError(f"percdamp must be > 0, got {percdamp}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        check_groups(groups, order)
        self.fit_target()
        cache, H, weights = self._cache(), self.H, self._weights
        means = (self.mu, self.mu_f) if self.centered else None
        if release:
            self.release()
        dead_groups = [g for g in range(geo.groups) if not bool((H[g].diagonal() > 0).any())]
        if len(dead_groups) == geo.groups:
            what = "constant (no variance about its mean: bias_refit centres the statistics)" if self.centered \
                else "zero"
            raise ValueError(f"{name}: every calibration input of this layer is {what} ({self.nsamples} samples), "
                             "so OBS has nothing to fit its weights to; check the calibration data, or quantize this "
                             "layer with method='rtn' or skip it")
        if self.nsamples < geo.k:
            warnings.warn(CalibrationWarning(
                f"{name}: {self.nsamples} calibration rows (tokens / output positions) for {geo.k} input columns: "
                "the Hessian cannot be full rank, so OBS leans on its damping; calibrate with at least "
                f"{geo.k} tokens / positions"), stacklevel=CALLER)
        if dead_groups:
            warnings.warn(CalibrationWarning(
                f"{name}: conv groups {dead_groups[:8]}{'...' if len(dead_groups) > 8 else ''} saw only zero "
                "inputs in calibration; their weights are rounded to nearest instead of zeroed"), stacklevel=CALLER)
        overlap = _resolve_overlap(self.layer, geo, overlap, name)
        grouping = _Grouping(geo, group_size, overlap)
        col_ov = column_overlap(overlap, geo.k, geo.cin_per_group)
        gid = grouping.gid.to(H.device)
        rows = geo.rows_per_group
        codes = torch.empty(geo.out_features, geo.k, dtype=torch.uint8, device=H.device)  # bits <= 8
        scales = torch.empty(geo.out_features, grouping.n_groups)
        zeros = torch.empty_like(scales)
        perms, loss, damp = [], 0.0, percdamp
        for g in range(geo.groups):
            r1, r2 = g * rows, (g + 1) * rows
            w = weights[g]
            w_dtype = w.dtype
            if release:
                weights[g] = None
            # a group without any input keeps its weights: identity Hessian = round to nearest
            diag = torch.ones(geo.k, dtype=w.dtype, device=w.device) if g in dead_groups \
                else H[g].diagonal().to(w.dtype, copy=True)
            dead = diag == 0
            diag.masked_fill_(dead, 1)
            if bool(dead.any()):
                w = w if release else w.clone()
                w[:, dead] = 0
            s, z = group_params(w.float().cpu(), grouping.gid, grouping.n_groups, bits, sym, mse, scale_dtype,
                                sym_grid)
            check_scales(s, w, scale_dtype, name)
            scales[r1:r2], zeros[r1:r2] = s, z
            s, z = s.to(w), z.to(w)
            key = (self.nsamples, g, percdamp, w.dtype)
            hinv, pd = cache[key] if key in cache else \
                self._inverse(None if g in dead_groups else H[g], dead, w.dtype, percdamp)
            if not release:
                cache[key] = (hinv, pd)  # q/k/v, gate/up: one inverse for the group
            h_cd = None
            if passes and g not in dead_groups:
                h_cd = self._damped(H[g], dead, w.dtype, pd)  # the H OBS used
                w_cd = w if release else w.clone()
            h_fit = None if not refit or g in dead_groups else H[g].to(w.dtype)
            wh = None if h_fit is None else w @ h_fit  # the refit's W H, before w is quantized
            if release and g == geo.groups - 1:
                H = None
                cache.clear()
            damp = max(damp, pd)
            if order == "reparam-dynamic":
                q, perm, l = _obs_dynamic(w, hinv, col_ov.to(w.device), s[:, gid], z[:, gid], bits, block_size)
                codes[r1:r2] = q.to(codes.dtype)
                q = codes[r1:r2]
            else:
                sal = None
                if order == "reparam":
                    sal = saliency(_rounding_error(w, s, z, gid, bits), hinv.diagonal())
                perm = static_order(order, diag, col_ov.to(w.device), sal)
                u = _upper_factor(hinv, perm, name)
                del hinv  # with release, freed here (and w below, once permuted)
                wp = w[:, perm]
                del w
                params = None if groups == "static" else self._group_params(bits, sym, mse, scale_dtype, sym_grid)
                q, l = _obs_static(wp, u, s, z, gid[perm], bits, block_size, params)
                del u, wp
                codes[r1:r2, perm] = q.to(codes.dtype)
                q = codes[r1:r2]
            if h_cd is not None:
                qf, dl = _coordinate_descent(w_cd, q.to(w_dtype), s[:, gid], z[:, gid], h_cd, perm.to(w_cd.device),
                                             bits, passes, block_size)
                codes[r1:r2] = qf.to(codes.dtype)
                q = codes[r1:r2]
                loss += dl
                del h_cd, w_cd
            if h_fit is not None:
                s, dl = _refit_scales(q.to(w_dtype) - z[:, gid], s, gid, h_fit, wh, scale_dtype)
                loss += dl
                del h_fit, wh
            scales[r1:r2], zeros[r1:r2] = s.cpu(), z.cpu()  # dynamic groups / refit: the ones used
            del q
            perms.append(perm.cpu())
            loss += l
        res = _finish(self.layer, geo, grouping, codes, scales, zeros, scale_dtype, torch.stack(perms),
                      float(loss), damp, bits, sym, order)
        if means is not None:
            res.bias = self._refit_bias(res.weight, *means)
        return res


GROUPS = ("static", "dynamic")


def check_groups(groups: str, order: str) -> str:
    """``groups`` is "static" or "dynamic"; dynamic groups need a static column order."""
    if groups not in GROUPS:
        raise ValueError(f"groups must be one of {GROUPS}, got {groups!r}")
    if groups == "dynamic" and order == "reparam-dynamic":
        raise ValueError("groups='dynamic' needs a static column order (none, act, reparam), not 'reparam-dynamic'")
    return groups


@torch.no_grad()
def fit_targets(quantizers: list[OBSQuantizer]) -> None:
    """:meth:`OBSQuantizer.fit_target` for the quantizers sharing one set of statistics (q/k/v),
    in the order that holds the fewest K x K buffers at once: every right-hand side
    ``W (C + lam I)`` while ``C`` is held, then ``C`` freed, then the shared factor of
    ``H + lam I`` formed and every fit solved in place, then the factor freed (docs/scale.md:
    working set). The float-target statistics are gone afterwards."""
    pending = [(q, q._unsolved()) for q in quantizers if q._weights is None]
    for q in quantizers:
        q.C = None
    for q, unsolved in pending:
        q._weights = q._solved(unsolved)
    for q in quantizers:
        for key in [k for k in q._inverses if isinstance(k, tuple) and k[0] == "fit"]:
            del q._inverses[key]
