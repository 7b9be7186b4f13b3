"""Crafted checkpoints: code-execution attempts, edited layer geometry, missing / mistyped
metadata fields and tensors. Each must raise a ValueError naming the file and the field (or
tensor), and nothing may be called or written."""
import json
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adagrow.cli import main
from adagrow.compress import QuantConfig, load_quantized, quantize, save_quantized
from adagrow.archs import ARCHITECTURES, build_arch, names
from adagrow.grow import GrowingCNN, GrowingTransformer, load_grown, save_grown
from adagrow.grow.nets import RepCNN, TinyViT
from adagrow.grow.reparam import reparameterize

CONV = "features.2"  # a fused 5x5 conv of the test model
CONV_F = re.escape("layers['features.2']")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A quantized RepCNN checkpoint (RTN, tier groups on convs), its deploy model and an input."""
    torch.manual_seed(0)
    model = RepCNN(widths=(8, 12), depth=1, stem_width=4, branches=("conv5x5", "conv3x3", "bn")).eval()
    deploy = reparameterize(model)
    qmodel = quantize(deploy, None, QuantConfig(bits=4, method="rtn"), progress=False)
    path = save_quantized(qmodel, tmp_path_factory.mktemp("q") / "q.safetensors")
    return path, deploy, qmodel


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    torch.manual_seed(0)
    model = GrowingCNN("vgg", widths=(8, 8, 8), depths=(1, 0, 0)).eval()
    model.stages[0][0][0].add_branch("conv1x1")
    return save_grown(model, tmp_path_factory.mktemp("g") / "g.safetensors"), model


def _craft(src, dst, meta_edit=None, tensor_edit=None):
    """Copy a checkpoint with its JSON metadata and/or tensors edited in place."""
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["adagrow"])
    tensors = load_file(str(src))
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(dst), metadata={"adagrow": json.dumps(meta)})
    return dst


def _refused(tmp_path, src, match, meta_edit=None, tensor_edit=None, loader=load_quantized):
    path = _craft(src, tmp_path / "crafted.safetensors", meta_edit, tensor_edit)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=match) as info:
        loader(path)
    assert str(path) in str(info.value)  # the error names the file
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    return info.value


# ----------------------------------------------------------------------------- code execution
def _evil_pickle(tmp_path):
    marker = tmp_path / "pickle_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Payload()))
    return tmp_path / "evil.pkl", marker


@pytest.mark.parametrize("shape", ["v1", "extra-key", "in-args"])
@pytest.mark.parametrize("target", ["adagrow.files:write_json", "adagrow.data:_unpickle"])
def test_checkpoint_cannot_name_code(ckpt, tmp_path, shape, target) -> None:
    victim = tmp_path / "victim.json"
    evil_pkl, marker = _evil_pickle(tmp_path)
    kwargs = {"path": str(victim), "obj": {"pwned": 1}} if "write_json" in target else {"path": str(evil_pkl)}
    bad = {"builder": target, "kwargs": kwargs}

    def edit(meta):
        if shape == "v1":  # the old format: an import path and keyword arguments
            meta["arch"] = bad
        elif shape == "extra-key":
            meta["arch"].update(bad)
        else:
            meta["arch"]["args"].update(bad)

    _refused(tmp_path, ckpt[0], r"field arch(\.args)?: Additional properties are not allowed \('builder'", edit)
    assert not victim.exists() and not marker.exists()


def test_cli_export_of_crafted_checkpoint_writes_nothing(ckpt, tmp_path, capsys) -> None:
    victim = tmp_path / "victim.json"
    path = _craft(ckpt[0], tmp_path / "evil.safetensors",
                  lambda m: m.update(arch={"builder": "adagrow.files:write_json",
                                           "kwargs": {"path": str(victim), "obj": 1}}))
    rc = main(["export", str(path), "--precision", "w4", "--out", str(tmp_path / "m.onnx"), "--quiet"])
    assert rc == 2 and "field arch" in capsys.readouterr().err
    assert not victim.exists() and not (tmp_path / "m.onnx").exists()


def test_grown_checkpoint_cannot_name_code(grown, tmp_path) -> None:
    victim = tmp_path / "victim.json"
    _refused(tmp_path, grown[0], r"field arch: Additional properties are not allowed \('builder', 'kwargs' were",
             lambda m: m["arch"].update(builder="adagrow.files:write_json", kwargs={"path": str(victim), "obj": 1}),
             loader=load_grown)
    assert not victim.exists()


# ----------------------------------------------------------------------------- architecture records
@pytest.mark.parametrize("edit,match", [
    (lambda a: a.update(name="os.system"), r"arch\.name: 'os.system' is not one of"),
    (lambda a: a.pop("name"), "'name' is a required property"),
    (lambda a: a.update(args=[1, 2]), r"arch\.args: \[1, 2\] is not of type 'object'"),
    (lambda a: a["args"].update(depth="2"), r"arch\.args\.depth: '2' is not of type 'integer'"),
    (lambda a: a["args"].update(depth=2.0), r"arch\.args\.depth: 2\.0 is not of type 'integer'"),
    (lambda a: a["args"].update(depth=True), r"arch\.args\.depth: True is not of type 'integer'"),
    (lambda a: a["args"].update(depth=-1), r"arch\.args\.depth: -1 is less than the minimum of 0"),
    (lambda a: a["args"].update(widths=[8, 10**9]), r"arch\.args\.widths\[1\]: 1000000000 is greater than"),
    (lambda a: a["args"].update(kernel_size=4), r"arch\.args\.kernel_size: 4 should not be valid"),
    (lambda a: a["args"].update(branches=["conv3x3", "__import__('os')"]), r"arch\.args\.branches\[1\]"),
    (lambda a: a["args"].pop("stem_width"), r"arch\.args: 'stem_width' is a required property"),
    (lambda a: a["args"].update(branches=["conv7x7"]), r"arch\.args: architecture 'repcnn' cannot be built.*"
                                                       r"does not fit in kernel 5x5"),
], ids=["unknown-name", "no-name", "args-list", "str-int", "float-int", "bool-int", "negative", "huge",
        "even-kernel", "bad-branch", "missing-arg", "branch-too-big"])
def test_architecture_record_is_checked(ckpt, tmp_path, edit, match) -> None:
    _refused(tmp_path, ckpt[0], match, lambda m: edit(m["arch"]))


def test_registry_covers_every_adagrow_arch() -> None:
    models = [RepCNN(widths=(4,), depth=1, stem_width=4), TinyViT(dim=8, heads=2, depth=1),
              GrowingTransformer("bert", dim=8, head_dim=4, vocab_size=20, max_len=8),
              *(GrowingCNN(f, widths=(8, 8, 8), depths=(1, 0, 1)) for f in ("vgg", "resnet", "bottleneck",
                                                                             "mobilenetv3"))]
    for model in models:
        rebuilt = build_arch(model.adagrow_arch(), "test")
        assert type(rebuilt) is type(model)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
               {k: v.shape for k, v in model.state_dict().items()}
    assert {m.adagrow_arch()["name"] for m in models} == set(names()) - {"hf"}  # "hf": tests/test_hf.py
    with pytest.raises(ValueError, match="f.json: field arch.args: architecture 'tinyvit' cannot be built"):
        build_arch({"name": "tinyvit", "args": {**models[1].adagrow_arch()["args"], "patch": 5}}, "f.json")


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("arch"), r"field arch: None is not of type 'object'"),
    (lambda m: m["arch"].update(type="evil"), r"field arch: Additional properties are not allowed"),
    (lambda m: m["arch"].update(widths=[8, 8]), r"field arch\.widths: \[8, 8\] is too short"),
    (lambda m: m["arch"]["convs"].update({"__class__": {"kernel_size": [3, 3], "branches": ["conv3x3"]}}),
     "architecture 'vgg' cannot be built"),
    (lambda m: m["arch"]["convs"]["stem.0"].update(kernel_size=[3, 2]),
     r"field arch\.convs\['stem\.0'\]\.kernel_size\[1\]: 2 should not be valid"),
    (lambda m: m.update(input_shape=[1, -8, 8]), r"field input_shape\[1\]: -8 is less than the minimum of 1"),
], ids=["no-arch", "bad-type", "short-widths", "dunder-conv", "even-kernel", "input-shape"])
def test_grown_checkpoint_fields_are_checked(grown, tmp_path, edit, match) -> None:
    _refused(tmp_path, grown[0], match, edit, loader=load_grown)


def test_grown_checkpoint_with_nan_weights_is_refused(grown, tmp_path) -> None:
    _refused(tmp_path, grown[0], r"tensor 'head.weight' contains NaN",
             tensor_edit=_set("head.weight", lambda w: w.index_fill(0, torch.tensor([2]), float("nan"))),
             loader=load_grown)


# ----------------------------------------------------------------------------- layer metadata
@pytest.mark.parametrize("key,value", [("padding", [0, 0]), ("stride", [2, 2]), ("dilation", [2, 2]),
                                       ("kernel_size", [3, 3]), ("groups", 2), ("in_channels", 3),
                                       ("out_features", 13), ("k", 99), ("bias", False)])
def test_edited_geometry_is_refused(ckpt, tmp_path, key, value) -> None:
    _refused(tmp_path, ckpt[0], rf"field {CONV_F}\.{key}: .* in the file, but the model's layer has",
             lambda m: m["layers"][CONV].update({key: value}))
    path = tmp_path / "crafted.safetensors"
    with pytest.raises(ValueError, match=rf"{CONV_F}\.{key}"):  # also against a float model passed in
        load_quantized(path, model=ckpt[1])


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("layers"), "metadata: 'layers' is a required property"),
    (lambda m: m.pop("arch"), "metadata: 'arch' is a required property"),
    (lambda m: m.pop("deploy"), "metadata: 'deploy' is a required property"),
    (lambda m: m.pop("format_version"), "metadata: 'format_version' is a required property"),
    (lambda m: m.update(format_version="2"), r"metadata\.format_version: '2' is not of type 'integer'"),
    (lambda m: m.update(format_version=True), r"metadata\.format_version: True is not of type 'integer'"),
    (lambda m: m.update(format_version=99), r"field format_version: 99 is newer than this adagrow"),
    (lambda m: m.update(format="adagrow-grown"), r"field format: unknown format 'adagrow-grown'"),
    (lambda m: m.update(deploy="yes"), r"metadata\.deploy: 'yes' is not of type 'boolean'"),
    (lambda m: m.update(layers=[]), r"metadata\.layers: \[\] is not of type 'object'"),
    (lambda m: m.update(input_shape="1x8x8"), r"metadata\.input_shape: '1x8x8' is not of type 'array', 'null'"),
    (lambda m: m.update(layers={}), r"metadata\.layers: \{\} should be non-empty"),
    (lambda m: m.update(arch=None), r"field arch: the checkpoint records no architecture"),
    (lambda m: m["layers"]["fc"].update(kernel_size=[1, 1]),
     r"layers\.fc\.kernel_size: a linear layer has no kernel_size"),
    (lambda m: m["layers"][CONV].pop("bits"), rf"{CONV_F}: 'bits' is a required property"),
    (lambda m: m["layers"][CONV].pop("padding"), rf"{CONV_F}: 'padding' is a required property"),
    (lambda m: m["layers"][CONV].update(bits="4"), rf"{CONV_F}\.bits: '4' is not of type 'integer'"),
    (lambda m: m["layers"][CONV].update(bits=9), rf"{CONV_F}\.bits: 9 is greater than the maximum of 8"),
    (lambda m: m["layers"][CONV].update(bits=8),
     r"tensor 'features.2.qweight' is int32 \[13, 8\] in the file; the metadata and model expect int32 \[26, 8\]"),
    (lambda m: m["layers"][CONV].update(group_size=12), rf"{CONV_F}\.group_size: 12 is not valid"),
    (lambda m: m["layers"][CONV].update(group_size="position"), rf"{CONV_F}\.n_groups: \d+ does not fit"),
    (lambda m: m["layers"][CONV].update(group_size=16), rf"{CONV_F}\.n_groups: \d+ does not fit"),
    (lambda m: m["layers"]["fc"].update(group_size="tier"), r"layers\.fc\.group_size: 'tier' groups kernel"),
    (lambda m: m["layers"][CONV].update(n_groups=40), rf"{CONV_F}\.n_groups: 40 does not fit"),
    (lambda m: m["layers"][CONV].update(scale_dtype="float32"), rf"{CONV_F}\.scale_dtype: 'float32' is not one"),
    (lambda m: m["layers"][CONV].update(scale_dtype="bfloat16"),
     r"tensor 'features.2.scales' is float16 \[\d+, 8\] in the file; the metadata and model expect bfloat16"),
    (lambda m: m["layers"].update({"features.99": m["layers"][CONV]}), r"layers\['features\.99'\]: no such layer"),
    (lambda m: m["layers"].update({"__class__": m["layers"][CONV]}), r"layers\.__class__: no such layer"),
    (lambda m: m["layers"].update({"a..b": m["layers"][CONV]}), r"metadata\.layers: 'a\.\.b' does not match"),
    (lambda m: m["layers"].update({"features.1": m["layers"][CONV]}), r"layers\['features\.1'\]: the model's "
                                                                       "layer cannot be quantized"),
], ids=["no-layers", "no-arch", "no-deploy", "no-version", "version-str", "version-bool", "version-new", "format",
        "deploy-str", "layers-list", "input-shape", "layers-empty", "arch-null", "linear-conv-field", "no-bits",
        "no-padding",
        "bits-str", "bits-9", "bits-8", "gs-12", "gs-position", "gs-16", "linear-tier", "n-groups",
        "scale-f32", "scale-bf16", "no-such-layer", "dunder-layer", "bad-layer-name", "relu-layer"])
def test_metadata_fields_are_checked(ckpt, tmp_path, edit, match) -> None:
    _refused(tmp_path, ckpt[0], match, edit)


# ----------------------------------------------------------------------------- tensors
def _set(key, fn):
    def edit(t):
        t[key] = fn(t[key])
    return edit


@pytest.mark.parametrize("edit,match", [
    (_set(f"{CONV}.scales", lambda s: s.float()), r"'features.2.scales' is float32 .* expect float16"),
    (_set(f"{CONV}.qweight", lambda q: q[:-1]), r"'features.2.qweight' is int32 \[12, 8\] .* expect int32 \[13, 8\]"),
    (_set("fc.bias", lambda b: b.double()), r"'fc.bias' is float64"),
    (_set(f"{CONV}.scales", lambda s: s.index_fill(0, torch.tensor([0]), float("nan"))),
     r"'features.2.scales' contains NaN"),
    (_set(f"{CONV}.bias", lambda b: b.index_fill(0, torch.tensor([1]), float("inf"))),
     r"'features.2.bias' contains inf"),
    (_set(f"{CONV}.scales", lambda s: s.index_fill(0, torch.tensor([0]), 0.0)), r"'features.2.scales' has zero scales"),
    (_set(f"{CONV}.zeros", lambda z: z + 99), r"'features.2.zeros' holds zero points that are not integers in 0..15"),
    (_set(f"{CONV}.zeros", lambda z: z + 0.5), r"'features.2.zeros' holds zero points"),
    (_set(f"{CONV}.position_group", lambda p: p + 7), r"'features.2.position_group' points outside"),
    (lambda t: t.pop(f"{CONV}.scales"), r"missing \['features.2.scales'\]"),
    (lambda t: t.update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
], ids=["scale-dtype", "qweight-shape", "bias-f64", "scale-nan", "bias-inf", "scale-neg", "zeros-range",
        "zeros-frac", "pg-range", "missing", "extra"])
def test_tensors_are_checked(ckpt, tmp_path, edit, match) -> None:
    _refused(tmp_path, ckpt[0], match, tensor_edit=edit)


def test_untouched_checkpoint_still_loads(ckpt, tmp_path) -> None:
    path = _craft(ckpt[0], tmp_path / "copy.safetensors")
    x = torch.randn(4, 1, 9, 9)
    assert torch.equal(load_quantized(path)(x), ckpt[2](x))


def test_version_1_checkpoint_loads_only_onto_a_given_model(ckpt, tmp_path) -> None:
    """Format 1 recorded a builder import path: never called, but the weights load onto model=."""
    def v1(meta):
        meta.update(format_version=1, arch={"builder": "adagrow.grow.nets:RepCNN", "kwargs": meta["arch"]["args"]})
    path = _craft(ckpt[0], tmp_path / "v1.safetensors", v1)
    with pytest.raises(ValueError, match=r"field arch: Additional properties are not allowed \('builder', 'kwargs'"):
        load_quantized(path)
    x = torch.randn(4, 1, 9, 9)
    assert torch.equal(load_quantized(path, model=ckpt[1])(x), ckpt[2](x))
