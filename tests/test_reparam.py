"""RepConv2d: eval-mode equivalence of the fused conv, overlap maps, and errors."""
import pytest
import torch
from torch import nn

from adagrow.grow.reparam import RepConv2d, overlap_map, reparameterize


def _randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Give every BN non-trivial running statistics and affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.2)
            m.weight.data.copy_(torch.randn(n, generator=gen))
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.3)


def _check_equivalent(block: RepConv2d, h: int, w: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    _randomize_bn(block, gen)
    block.eval()
    x = torch.randn(2, block.in_channels, h, w, generator=gen)
    with torch.no_grad():
        ref = block(x)
        fused = block.fuse()
        out = fused(x)
    assert out.shape == ref.shape
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 1e-5 * scale, block.branches


SINGLE = ["conv3x3", "conv1x1", "conv1x3", "conv3x1", "conv5x5", "conv5x3", "conv3x5",
          "avg3x3", "avg5x5", "bn", "conv1x1-conv3x3", "conv1x1-conv5x5"]


@pytest.mark.parametrize("spec,stride", [(s, st) for s in SINGLE for st in (1, 2)
                                         if not (s == "bn" and st == 2)])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_single_branch_equivalence(spec: str, stride: int, groups: int) -> None:
    block = RepConv2d(6, 6, 5, stride=stride, groups=groups, branches=(spec,))
    _check_equivalent(block, 7, 9)


@pytest.mark.parametrize("spec", ["avg3x3", "conv1x1-conv3x3", "conv5x3"])
@pytest.mark.parametrize("groups", [1, 2])
def test_channel_change_equivalence(spec: str, groups: int) -> None:
    block = RepConv2d(4, 8, 5, stride=2, groups=groups, branches=(spec,))
    _check_equivalent(block, 13, 13)


@pytest.mark.parametrize("stride", [1, 2])
def test_all_branches_combined(stride: int) -> None:
    specs = [s for s in SINGLE if not (s == "bn" and stride == 2)]
    block = RepConv2d(8, 8, 5, stride=stride, branches=specs)
    _check_equivalent(block, 13, 11, seed=3)


def test_depthwise_and_nonsquare_kernel() -> None:
    block = RepConv2d(12, 12, 5, groups=12, branches=("conv5x5", "conv3x3", "conv1x3", "bn", "avg3x3"))
    _check_equivalent(block, 9, 7)
    block = RepConv2d(4, 6, (3, 5), branches=("conv3x5", "conv1x5", "conv3x1", "conv1x1-conv3x3"))
    _check_equivalent(block, 7, 9)


def test_add_branch_to_live_module_and_zero_init() -> None:
    gen = torch.Generator().manual_seed(1)
    block = RepConv2d(6, 6, 5, branches=("conv3x3",))
    _randomize_bn(block, gen)
    block.eval()
    x = torch.randn(2, 6, 9, 9, generator=gen)
    before = block(x)
    block.add_branch("conv5x5", zero_init=True)
    assert torch.allclose(block(x), before, atol=0)
    block.train()
    block.add_branch("conv1x3")
    assert block.branches == ["conv3x3", "conv5x5", "conv1x3"]
    _check_equivalent(block, 9, 9)
    small = RepConv2d(6, 6, 3, branches=("conv3x3",))
    with pytest.raises(ValueError, match="does not fit"):
        small.add_branch("conv5x3")
    small.add_branch("conv5x3", grow_kernel=True)
    assert small.kernel_size == (5, 3) and small.overlap().shape == (5, 3)
    _check_equivalent(small, 7, 8)


def test_overlap_maps_by_hand() -> None:
    ov = overlap_map(["conv5x5", "conv3x3", "conv1x1", "bn"], (5, 5))
    expected = torch.tensor([[1, 1, 1, 1, 1],
                             [1, 2, 2, 2, 1],
                             [1, 2, 4, 2, 1],
                             [1, 2, 2, 2, 1],
                             [1, 1, 1, 1, 1]])
    assert torch.equal(ov, expected)
    ov = overlap_map(["conv3x3", "conv1x3", "conv3x1", "avg3x3"], (3, 3))
    assert torch.equal(ov, torch.tensor([[2, 3, 2], [3, 4, 3], [2, 3, 2]]))
    ov = overlap_map(["conv1x5", "conv1x1-conv3x3"], (5, 5))
    assert torch.equal(ov, torch.tensor([[0, 0, 0, 0, 0],
                                         [0, 1, 1, 1, 0],
                                         [1, 2, 2, 2, 1],
                                         [0, 1, 1, 1, 0],
                                         [0, 0, 0, 0, 0]]))


def test_reparameterize_model_keeps_original_and_overlap() -> None:
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(
        RepConv2d(3, 8, 5, branches=("conv5x5", "conv3x3", "conv1x1")),
        nn.ReLU(),
        nn.Sequential(RepConv2d(8, 8, 3, stride=2, groups=8, branches=("conv3x3", "conv1x3", "avg3x3"))),
    )
    _randomize_bn(model, gen)
    model.eval()
    x = torch.randn(2, 3, 13, 13, generator=gen)
    deploy = reparameterize(model)
    assert isinstance(model[0], RepConv2d) and isinstance(model[2][0], RepConv2d)
    assert isinstance(deploy[0], nn.Conv2d) and isinstance(deploy[2][0], nn.Conv2d)
    assert torch.equal(deploy[0].reparam_overlap, model[0].overlap())
    assert deploy[2][0].groups == 8 and deploy[2][0].stride == (2, 2)
    with torch.no_grad():
        ref, out = model(x), deploy(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the overlap map survives a state_dict round trip into a freshly fused skeleton
    skeleton = reparameterize(model)
    skeleton.load_state_dict(deploy.state_dict())
    assert "0.reparam_overlap" in deploy.state_dict()


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown branch spec"):
        RepConv2d(4, 4, 3, branches=("dil3x3",))
    with pytest.raises(ValueError, match="does not fit"):
        RepConv2d(4, 4, 3, branches=("conv5x5",))
    with pytest.raises(ValueError, match="in == out"):
        RepConv2d(4, 8, 3, branches=("bn",))
    with pytest.raises(ValueError, match="stride 1"):
        RepConv2d(4, 4, 3, stride=2, branches=("bn",))
    with pytest.raises(ValueError, match="odd"):
        RepConv2d(4, 4, 3, branches=("conv2x2",))
    with pytest.raises(ValueError, match="odd"):
        RepConv2d(4, 4, 4)
    with pytest.raises(ValueError, match="groups"):
        RepConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match=r"needs at least one branch \(branches=\(\) would compute nothing\)"):
        RepConv2d(4, 4, 3, branches=())
    with pytest.raises(ValueError, match=r"not the string 'conv3x3' \(did you mean \['conv3x3'\]\?\)"):
        RepConv2d(4, 4, 3, branches="conv3x3")
    block = RepConv2d(4, 4, 3)
    with pytest.raises(RuntimeError, match="eval mode"):
        block.fuse()
    with pytest.raises(RuntimeError, match="eval"):
        reparameterize(nn.Sequential(block))


def test_bad_arguments_are_named() -> None:
    for cin in (0, -1):
        with pytest.raises(ValueError, match=f"RepConv2d in_channels must be an integer >= 1, got {cin}"):
            RepConv2d(cin, 8, 3)
    with pytest.raises(TypeError, match="reparameterize\\(\\) takes a torch.nn.Module, got NoneType"):
        reparameterize(None)
