"""OBS options: dynamic groups (the reference GPTQ's) and the float-target ridge ``target_damp``."""
import pytest
import torch
from torch import nn

from adagrow.compress import OBSQuantizer, QuantConfig
from adagrow.compress.grid import dequantize_codes, grid_params, quantize_codes
from adagrow.compress.layer import geometry, input_columns, weight_matrix


def _gptq_reference(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, percdamp: float) -> torch.Tensor:
    """IST-DASLab/gptq's ``fasterquant`` (no act order, column by column, float64): each group's
    grid from the weights as updated when its first column is reached. Returns the dequantized weight."""
    w, h = w.double().clone(), h.double().clone()
    h.diagonal().add_(percdamp * float(h.diagonal().mean()))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for i in range(w.shape[1]):
        if i % group_size == 0:
            s, z = grid_params(w[:, i:i + group_size], bits, False)
            s, z = s.double(), z.double()
        out[:, i] = dequantize_codes(quantize_codes(w[:, i], s, z, bits), s, z)
        err = (w[:, i] - out[:, i]) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
    return out


def _layer_and_inputs(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    lin = nn.Linear(64, 24)
    x = torch.randn(300, 64) @ torch.randn(64, 64) * 0.3  # correlated inputs: OBS moves weights a lot
    return lin, x


def _quantize(lin: nn.Linear, x: torch.Tensor, groups: str, order: str = "none", **kw) -> torch.Tensor:
    q = OBSQuantizer(lin, dtype=torch.float64)
    q.add_batch(x)
    return q.quantize(bits=4, group_size=16, order=order, percdamp=0.01, block_size=16, groups=groups, refit=False,
                      **kw).weight


def test_dynamic_groups_match_the_reference_gptq() -> None:
    lin, x = _layer_and_inputs()
    h = 2 * x.double().t() @ x.double() / x.shape[0]
    ref = _gptq_reference(lin.weight.detach(), h, 4, 16, 0.01)
    dynamic, static = _quantize(lin, x, "dynamic"), _quantize(lin, x, "static")
    assert torch.allclose(dynamic.double(), ref, atol=1e-5)
    assert not torch.allclose(static.double(), ref, atol=1e-3)  # static groups are another grid


@pytest.mark.parametrize("block_size", [8, 24])
def test_dynamic_groups_store_the_grid_they_used(block_size: int) -> None:
    """Blocks aligned with the groups or not: the stored scales / zeros are the grid the codes are on.
    (With act / reparam orders the first block usually reaches every group, so dynamic = static.)"""
    order = "none"
    lin, x = _layer_and_inputs(1)
    q = OBSQuantizer(lin)
    q.add_batch(x)
    res = q.quantize(bits=4, group_size=16, order=order, block_size=block_size, groups="dynamic")
    gid = torch.arange(64) // 16
    s, z = res.scales.float().t()[:, gid], res.zeros.float().t()[:, gid]
    codes = torch.round(res.weight / s) + z
    assert bool((codes >= 0).all() and (codes <= 15).all())
    assert torch.allclose(dequantize_codes(codes, s, z), res.weight, atol=1e-6)
    static = OBSQuantizer(lin)
    static.add_batch(x)
    assert not torch.equal(static.quantize(bits=4, group_size=16, order=order, block_size=block_size).scales, res.scales)


def test_groups_and_target_damp_are_checked() -> None:
    with pytest.raises(ValueError, match="groups must be one of"):
        QuantConfig(groups="lazy").validate()
    with pytest.raises(ValueError, match="static column order"):
        QuantConfig(groups="dynamic", order="reparam-dynamic").validate()
    with pytest.raises(ValueError, match="target_damp must be > 0"):
        QuantConfig(target_damp=0.0).validate()


def test_target_damp_pulls_the_fit_toward_the_weight() -> None:
    """The float-target fit ``W (C + lam I)(H + lam I)^-1`` moves toward ``W`` as the ridge grows,
    and toward the least-squares fit ``W C H^-1`` as it shrinks."""
    lin, _ = _layer_and_inputs(2)
    x = torch.randn(300, 64)  # well conditioned: the tiny-ridge fit is the least-squares one to 1e-6
    xf = x + 0.2 * torch.randn_like(x)  # the float model's inputs differ from the quantized prefix's
    w = lin.weight.detach().double()
    dist = []
    for damp in (1e-6, 0.1, 1.0, 10.0):
        q = OBSQuantizer(lin, dtype=torch.float64, target_damp=damp)
        q.add_batch(x, target=xf)
        q.fit_target()
        dist.append(float((q._weights[0] - w).norm()))
    assert dist == sorted(dist, reverse=True) and dist[-1] < 0.2 * dist[0]
    h, c = x.double().t() @ x.double(), xf.double().t() @ x.double()
    q = OBSQuantizer(lin, dtype=torch.float64, target_damp=1e-9)
    q.add_batch(x, target=xf)
    q.fit_target()
    assert torch.allclose(q._weights[0], w @ c @ torch.linalg.inv(h), atol=1e-5)


@pytest.mark.parametrize("order", ["none", "act", "reparam", "reparam-dynamic"])
def test_scale_refit_lowers_the_measured_output_error(order: str) -> None:
    """The refitted scales are a least-squares solution for the codes chosen: the measured output
    error ``||(W - W_hat) X||^2 / n`` is not higher than with the scales OBS used, the codes stay,
    and the reported loss follows the measured one (tiny damping: the OBS loss identity)."""
    lin, x = _layer_and_inputs(3)
    out = {}
    for refit in (False, True):
        q = OBSQuantizer(lin, dtype=torch.float64)
        q.add_batch(x)
        out[refit] = q.quantize(bits=4, group_size=16, order=order, percdamp=1e-9, block_size=8, refit=refit)
    err = {k: float(((lin.weight.detach().double() - r.weight.double()) @ x.double().t()).square().sum()) / len(x)
           for k, r in out.items()}
    assert err[True] < 0.95 * err[False]
    assert torch.equal(out[True].qweight, out[False].qweight) and not torch.equal(out[True].scales, out[False].scales)
    assert out[True].loss == pytest.approx(err[True], rel=1e-4) and out[False].loss == pytest.approx(err[False], rel=1e-4)


@pytest.mark.parametrize("group_size", [16, "tier"])
def test_scale_refit_on_a_grouped_conv(group_size) -> None:
    """Conv layers (two conv groups, an overlap map, tier groups whose columns are not contiguous):
    the refit lowers the measured output error and the reported loss still equals it."""
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    conv.register_buffer("reparam_overlap", torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]]))
    x = torch.randn(30, 8, 6, 6)
    geo = geometry(conv)
    cols = input_columns(x, geo).double()
    out = {}
    for refit in (False, True):
        q = OBSQuantizer(conv, dtype=torch.float64)
        q.add_batch(x)
        res = q.quantize(bits=3, group_size=group_size, percdamp=1e-9, block_size=8, refit=refit)
        delta = weight_matrix(conv.weight.detach(), geo).double() - weight_matrix(res.weight, geo).double()
        err = sum(float((delta[g * 4:(g + 1) * 4] @ cols[g]).square().sum()) for g in range(2)) / cols.shape[-1]
        out[refit] = (res.loss, err)
    assert out[True][1] < out[False][1]
    for loss, err in out.values():
        assert loss == pytest.approx(err, rel=1e-4)
