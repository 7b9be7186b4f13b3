"""Growth: schedule, greedy locations, stopping, optimizer state, function preservation,
checkpoints, and two-process DDP (gloo) agreement."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from adagrow.grow import (GrowingCNN, GrowingTransformer, Grower, GrowthConfig, apply_growth, grow, load_grown,
                          reparameterize, save_grown)
from adagrow.grow.optim import rebuild_optimizer


def _data(n: int = 96, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :4].mean((1, 2, 3)) > 0).long()
    return (x[: n * 3 // 4], y[: n * 3 // 4]), (x[n * 3 // 4:], y[n * 3 // 4:])


def _cnn(family: str = "vgg") -> GrowingCNN:
    torch.manual_seed(0)
    return GrowingCNN(family, widths=(8, 8, 16), num_classes=4)


def _vit() -> GrowingTransformer:
    torch.manual_seed(0)
    return GrowingTransformer("vit", dim=16, head_dim=4, heads=2, depth=1, mlp_per_head=8, num_classes=4,
                              img_size=8, patch=4)


@pytest.mark.parametrize("make,pattern", [(_cnn, ["depth", "depth", "width"]), (_vit, ["width", "width", "depth"])])
def test_growth_follows_schedule(make, pattern) -> None:
    train, val = _data()
    res = grow(make(), train, val, epochs=7, config=GrowthConfig(stop=10**9, interval=2), lr=0.01, progress=False)
    events = [(h["epoch"], h["growth"]["kind"]) for h in res.history if "growth" in h]
    assert events == list(zip([2, 4, 6], pattern))
    assert len(res.history) == 7 and res.history[-1]["params_train"] > res.history[0]["params_train"]


def test_greedy_location_is_largest_gamma_stage() -> None:
    model = _cnn()
    model.insert_layer(1, 1)
    model.insert_layer(1, 2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(0.5)
        for m in model.stages[1][1].modules():  # the first family layer of stage 1 matters most
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(3.0)
    decision = Grower(model, GrowthConfig(stop="auto")).decide(model, None)
    assert decision == {"kind": "depth", "stage": 1, "position": 2}  # right after that layer
    grower = Grower(model, GrowthConfig(stop="auto", location="random", seed=3))
    assert all(grower._depth(model)["stage"] in (0, 1, 2) for _ in range(5))


def test_width_growth_targets_top_layers_and_grows_kernels() -> None:
    model = _cnn()
    model.insert_layer(0, 0)
    convs = model.rep_convs()
    decision = Grower(model, GrowthConfig(stop="auto", seed=1))._width(model)
    assert len(decision["branches"]) == -(-7 * len(convs) // 10)  # ceil(70%)
    apply_growth(model, {"kind": "width", "branches": {n: "conv5x5" for n in convs}}, GrowthConfig())
    assert all(c.kernel_size == (5, 5) and c.branches[-1] == "conv5x5" for c in model.rep_convs().values())


def test_spec_and_budget_are_respected_exactly() -> None:
    train, val = _data()
    res = grow(_cnn(), train, val, epochs=12, config=GrowthConfig(stop="VGG-1-1-0", interval=1), lr=0.01,
               progress=False)
    assert res.model.spec() == "VGG-1-1-0"
    res = grow(_vit(), train, val, epochs=12, config=GrowthConfig(stop="ViT-D2-H3", interval=1), progress=False)
    assert res.model.spec() == "ViT-D2-H3"
    budget = _cnn().param_counts()[0] + 3000
    res = grow(_cnn(), train, val, epochs=12, config=GrowthConfig(stop=budget, interval=1), lr=0.01, progress=False)
    deploy, train_p = res.model.param_counts()
    assert deploy <= budget and train_p <= 1.5 * budget
    trial = Grower(res.model, GrowthConfig(stop=10**9))  # the step it refused would have broken the budget
    nxt = trial.decide(res.model, None)
    apply_growth(res.model, nxt, GrowthConfig())
    d2, t2 = res.model.param_counts()
    assert d2 > budget or t2 > 1.5 * budget


def test_auto_stop_after_tolerated_small_gains() -> None:
    model = _cnn()
    grower = Grower(model, GrowthConfig(stop="auto", auto_threshold=0.03, auto_tolerance=1, ema=1.0))
    assert grower.decide(model, 0.50) is not None
    assert grower.decide(model, 0.60) is not None   # +10%: fine
    assert grower.decide(model, 0.61) is not None   # +1%: first strike, tolerated
    assert grower.decide(model, 0.615) is None      # second strike: stop
    assert grower.decide(model, 0.90) is None       # and stays stopped


def test_bad_specs_and_budgets() -> None:
    model = _cnn()
    for spec in ("VGG-1-2", "ResNet-1-1-1", "VGG-a-b-c", "ViT-D2-H2"):
        with pytest.raises(ValueError, match="spec"):
            Grower(model, GrowthConfig(stop=spec))
    with pytest.raises(ValueError, match="below the starting model"):
        Grower(model, GrowthConfig(stop=100))
    with pytest.raises(ValueError, match="location"):
        Grower(model, GrowthConfig(location="best"))
    with pytest.raises(ValueError, match="smaller than the model"):
        Grower(_vit(), GrowthConfig(stop="ViT-D1-H1"))
    with pytest.raises(TypeError, match="GrowingCNN or GrowingTransformer"):
        grow(nn.Linear(2, 2), _data()[0], _data()[1], epochs=1)
    with pytest.raises(ValueError, match="unknown CNN family"):
        GrowingCNN("densenet")


def test_optimizer_state_is_carried() -> None:
    model = _vit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 1, 8, 8)
    model(x).sum().backward()
    opt.step()
    old_qkv = model.layers[0].qkv.weight
    old_state = {k: v.clone() for k, v in opt.state[old_qkv].items()}
    embed = model.embed.weight
    carry = model.add_head()
    new = rebuild_optimizer(opt, model, carry)
    assert new.state[embed] is opt.state[embed]  # surviving parameter: same state
    st = new.state[model.layers[0].qkv.weight]
    rows = carry[model.layers[0].qkv.weight][2]
    assert torch.equal(st["exp_avg"][rows], old_state["exp_avg"]) and torch.equal(st["step"], old_state["step"])
    fresh = torch.ones(st["exp_avg"].shape[0], dtype=torch.bool)
    fresh[rows] = False
    assert fresh.sum() == 3 * 4 and not st["exp_avg"][fresh].any() and not st["exp_avg_sq"][fresh].any()
    assert new.param_groups[0]["lr"] == 1e-3 and new.param_groups[0]["weight_decay"] == opt.param_groups[0]["weight_decay"]
    # SGD momentum survives a CNN depth growth
    cnn = _cnn()
    sgd = torch.optim.SGD(cnn.parameters(), lr=0.1, momentum=0.9)
    cnn(torch.randn(2, 1, 8, 8)).sum().backward()
    sgd.step()
    buf = sgd.state[cnn.head.weight]["momentum_buffer"].clone()
    cnn.insert_layer(0, 0)
    sgd2 = rebuild_optimizer(sgd, cnn)
    assert torch.equal(sgd2.state[cnn.head.weight]["momentum_buffer"], buf)
    assert sgd2.param_groups[0]["momentum"] == 0.9 and len(sgd2.param_groups[0]["params"]) > len(sgd.param_groups[0]["params"])


@pytest.mark.parametrize("family", ["resnet", "bottleneck", "mobilenetv3"])
def test_zero_init_preserves_function(family: str) -> None:
    model = _cnn(family)
    model.insert_layer(1, 1)
    x = torch.randn(3, 1, 8, 8)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        torch.manual_seed(1)
        before = model(x)
        model.insert_layer(1, 1, zero_init=True)
        model.stem[0].add_branch("conv5x5", zero_init=True, grow_kernel=True)
        torch.manual_seed(1)
        assert torch.allclose(model(x), before, atol=1e-6), mode
    model.insert_layer(1, 1, zero_init=False)  # the thesis' default init does change the function
    assert (model.eval()(x) - before).abs().max() > 1e-5


def test_zero_init_transformer_growth_preserves_function() -> None:
    model = _vit()
    x = torch.randn(3, 1, 8, 8)
    before = model(x)
    model.add_head(zero_init=True)
    model.insert_layer(0, zero_init=True)
    assert model.spec() == "ViT-D2-H3" and torch.allclose(model(x), before, atol=1e-6)
    model.add_head()
    assert not torch.allclose(model(x), before, atol=1e-3)


@pytest.mark.parametrize("make", [_cnn, _vit])
def test_grown_saved_loaded_fused_same_outputs(tmp_path, make) -> None:
    train, val = _data()
    res = grow(make(), train, val, epochs=5, config=GrowthConfig(stop=10**9, interval=1), lr=0.01, progress=False)
    path = save_grown(res.model, tmp_path / "g.safetensors")
    loaded = load_grown(path)
    x = val[0][:8]
    assert loaded.spec() == res.model.spec() and torch.equal(loaded(x), res.model(x))
    deploy = reparameterize(loaded)
    assert (deploy(x) - res.model(x)).abs().max() < 1e-4 * res.model(x).abs().max() + 1e-6
    if isinstance(loaded, GrowingCNN):
        fused = [m for m in deploy.modules() if isinstance(m, nn.Conv2d) and hasattr(m, "reparam_overlap")]
        assert fused and any(int(m.reparam_overlap.max()) > 1 for m in fused)
    with pytest.raises(FileExistsError):
        save_grown(res.model, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_grown(path)
    with pytest.raises(FileNotFoundError):
        load_grown(tmp_path / "none.safetensors")


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # ranks start with different seeds: the growth must still agree
    model = GrowingCNN("resnet", widths=(8, 8, 16), num_classes=4)
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)
    train, val = _data()
    res = grow(model, train, val, epochs=5, config=GrowthConfig(stop=10**9, interval=1, location="random",
                                                                 seed=rank), lr=0.01, progress=False)
    torch.save({"arch": res.model.arch(), "state": res.model.state_dict()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_two_ranks_agree(tmp_path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    assert a["arch"] == b["arch"] and a["arch"]["depths"] != [0, 0, 0]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert os.path.exists(tmp_path / "out.0")


def test_bert_encoder_grows_on_token_ids() -> None:
    torch.manual_seed(0)
    model = GrowingTransformer("bert", dim=16, head_dim=4, heads=2, depth=1, mlp_per_head=8, num_classes=3,
                               vocab_size=50, max_len=12)
    ids = torch.randint(0, 50, (4, 10))
    before = model(ids)
    model.add_head(zero_init=True)
    model.insert_layer(0, zero_init=True)
    assert model.spec() == "BERT-D2-H3" and torch.allclose(model(ids), before, atol=1e-6)
    with pytest.raises(ValueError, match="int64 token ids"):
        model(torch.randn(4, 10))
    y = torch.randint(0, 3, (32,))
    x = torch.randint(0, 50, (32, 10))
    res = grow(model, (x[:24], y[:24]), (x[24:], y[24:]), epochs=3,
               config=GrowthConfig(stop="BERT-D3-H4", interval=1), progress=False)
    assert res.model.spec() in ("BERT-D2-H4", "BERT-D3-H3", "BERT-D3-H4")
