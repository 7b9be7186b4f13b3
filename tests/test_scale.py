"""Quantizing at scale: from a checkpoint folder one block at a time (same result as in memory)."""
import pytest
import torch

from adagrow.compress import QuantConfig, QuantLinear, quantize
from adagrow.compress.onload import quantize_pretrained

transformers = pytest.importorskip("transformers")
CFG = QuantConfig(bits=4, group_size=32)
CFG64 = QuantConfig(bits=4, group_size=32, hessian_dtype="float64")


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, tie_word_embeddings=True)).eval()
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64)).eval()
    return {"llama": llama, "bert": bert}


def _calib() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 120, (2, 4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 0, 10:] = 0
    return [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_quantize_pretrained_equals_in_memory(tmp_path, arch) -> None:
    model = _models()[arch]
    model.save_pretrained(tmp_path / "src")
    calib = _calib()
    ref = quantize(model, calib, CFG, progress=False)
    got = quantize_pretrained(tmp_path / "src", calib, CFG, dst=tmp_path / "dst", progress=False)
    n_blocks = len(ref.adagrow_quant["blocks"])
    assert got.adagrow_quant["blocks"] == ref.adagrow_quant["blocks"] and n_blocks == 3
    # each block read once by the probe (which also checks that the batches fit) and once to be quantized
    assert got.adagrow_quant["block_loads"] == 2 * n_blocks
    qref = {n: m for n, m in ref.named_modules() if isinstance(m, QuantLinear)}
    qgot = {n: m for n, m in got.named_modules() if isinstance(m, QuantLinear)}
    assert qref.keys() == qgot.keys() and len(qref) >= 3 * 6
    for n in qref:
        assert torch.equal(qref[n].qweight, qgot[n].qweight) and torch.equal(qref[n].scales, qgot[n].scales), n
    out = lambda m: m(**calib[0])[0]  # noqa: E731
    assert torch.equal(out(ref), out(got))
    assert (tmp_path / "dst" / "model.adagrow.safetensors").is_file()


def test_missing_tensor_is_named(tmp_path) -> None:
    from safetensors.torch import load_file, save_file
    model = _models()["bert"]
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layer.1.attention.self.query.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no tensor for \['encoder.layer.1.attention.self.query.weight'\]"):
        quantize_pretrained(tmp_path, _calib(), CFG, progress=False)


def _calib4() -> list[dict[str, torch.Tensor]]:
    return _calib() + [{k: v.flip(0) for k, v in b.items()} for b in _calib()]


class _Chain(torch.nn.Module):
    """Three Linear blocks and a head fed the last block's output, or (``skip``) also the first's."""

    def __init__(self, skip: bool):
        super().__init__()
        torch.manual_seed(0)
        self.skip = skip
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
                                          for _ in range(3))
        self.head = torch.nn.Linear(32 if skip else 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return self.head(torch.cat([feats[0], x], -1) if self.skip else x)


@pytest.mark.parametrize("skip", [False, True])
def test_head_calibrated_without_rerunning_blocks_only_when_it_sees_the_last_block_alone(skip) -> None:
    """A layer after the chain of blocks is calibrated from the last block's stored outputs (the
    blocks skipped) only when, on the first batch, that gives it bit-identical inputs; a head that
    also reads an earlier block's output has the blocks rerun."""
    model = _Chain(skip).eval()
    calls = [0]
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    calib = [torch.randn(8, 16) for _ in range(2)]
    q = quantize(model, calib, CFG, progress=False, inplace=True)
    assert q.adagrow_quant["blocks"] == ["blocks.0", "blocks.1", "blocks.2"]
    assert isinstance(q.head, QuantLinear)
    # per block: the probe (first sample, also the check that the batches fit), then per batch:
    # the layer's replay, the quantized block's output pass and the float copy's pass; block 0 once
    # per batch when its inputs are captured; + every block per batch for the head if the blocks are rerun
    assert calls[0] == 3 * (1 + 2 * 3) + 2 + (3 * 2 if skip else 0)


def test_group_replays_stop_before_their_first_layer_runs() -> None:
    """A group's replay ends at its first layer's input (a pre-hook), so the last group of a Llama
    block (down_proj) runs only in the probe (the first sample), the float copy's pass (the copy
    keeps the hooks) and the block's output pass, and the first (q/k/v) not in its own replay."""
    model = _models()["llama"]
    runs: dict[str, int] = {}
    for name, mod in model.named_modules():
        if name.endswith(("down_proj", "q_proj")):
            mod.register_forward_hook(lambda *a, name=name: runs.__setitem__(name, runs.get(name, 0) + 1))
    calib = _calib()
    quantize(model, calib, CFG, progress=False, inplace=True)
    for i in range(3):
        assert runs[f"model.layers.{i}.mlp.down_proj"] == 1 + 2 * len(calib)
        # per batch: the float pass, the replays of o_proj, gate/up and down_proj, the output pass
        assert runs[f"model.layers.{i}.self_attn.q_proj"] == 1 + 5 * len(calib)


def test_torchrun_two_ranks_match_one(tmp_path) -> None:
    """``python -m torch.distributed.run --nproc_per_node 2 -m adagrow.compress.torchrun`` (gloo,
    a tiny Llama read block by block, half the batches per rank, each layer solved by one rank and
    broadcast) writes the same quantized tensors, bit for bit, as one process on all the batches,
    with float64 statistics (docs/scale.md); both ranks end with that model, and each solved about
    half the layers."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from adagrow.compress.torchrun import main, write_batches
    _models()["llama"].save_pretrained(tmp_path / "src")
    write_batches(tmp_path / "calib.safetensors", _calib4())
    args = [str(tmp_path / "src"), str(tmp_path / "calib.safetensors")]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "adagrow.compress.torchrun", *args, str(tmp_path / "two"), "--hessian-dtype", "float64"],
                   check=True, cwd=root, env=env, timeout=300, capture_output=True)
    one = main([*args, str(tmp_path / "one"), "--hessian-dtype", "float64"])
    two_run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert one["ranks"] == 1 and one["per_rank"][0]["solved"] == 3 * 7
    # every rank's whole model (a digest of each of its tensors) equals the one-process model
    assert [r["digest"] for r in two_run["per_rank"]] == [one["per_rank"][0]["digest"]] * 2
    # the layers are shared (owners by estimated work: 11 and 10 of 21), not solved twice
    assert [r["solved"] for r in two_run["per_rank"]] == [11, 10]
    two = load_file(tmp_path / "two" / "model.adagrow.safetensors")
    ref = load_file(tmp_path / "one" / "model.adagrow.safetensors")
    assert two.keys() == ref.keys() and sum(k.endswith("qweight") for k in ref) == 3 * 7
    for k in ref:
        assert torch.equal(two[k], ref[k]), k


def test_ranks_that_disagree_are_named() -> None:
    """The torchrun entry point's rank comparison names the tensors that differ or are missing."""
    from adagrow.compress.torchrun import _disagreeing
    assert _disagreeing([{"a": "1", "b": "2"}, {"a": "1", "b": "2"}]) == []
    assert _disagreeing([{"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}]) == ["b", "c"]


def test_checkpoint_reader_refuses_a_tensor_outside_its_file(tmp_path) -> None:
    """Block weights are read straight from the safetensors bytes (no memory map); a file cut
    short or a header whose byte ranges do not match the tensors is refused, naming the tensor."""
    from adagrow.compress.onload import Checkpoint
    _models()["bert"].save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    ckpt = Checkpoint(tmp_path)
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(ckpt.get(key), _models()["bert"].state_dict()[key])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="does not fit its byte range"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_quantize_to_disk_writes_the_same_file_without_keeping_blocks(tmp_path, arch) -> None:
    """quantize_to_disk writes each quantized block out and drops it; the assembled file holds the
    same tensors and metadata as save_quantized(quantize_pretrained(...)) and loads back."""
    from safetensors import safe_open

    from adagrow.compress import load_quantized
    from adagrow.compress.onload import quantize_to_disk
    model = _models()[arch]
    model.save_pretrained(tmp_path / "src")
    calib = _calib()
    quantize_pretrained(tmp_path / "src", calib, CFG, dst=tmp_path / "ref", progress=False)
    path = quantize_to_disk(tmp_path / "src", tmp_path / "got", calib, CFG, progress=False)
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == ["model.adagrow.safetensors"]
    with safe_open(str(tmp_path / "ref" / "model.adagrow.safetensors"), "pt") as ref, safe_open(str(path), "pt") as got:
        assert ref.metadata() == got.metadata() and sorted(ref.keys()) == sorted(got.keys())
        for k in ref.keys():
            assert torch.equal(ref.get_tensor(k), got.get_tensor(k)), k
    load = lambda f: load_quantized(f, model=type(model)(model.config).eval())  # noqa: E731
    q, ref_q = load(path), load(tmp_path / "ref" / "model.adagrow.safetensors")
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) >= 3 * 6
    assert torch.equal(q(**calib[0])[0], ref_q(**calib[0])[0])
    with pytest.raises(FileExistsError):
        quantize_to_disk(tmp_path / "src", tmp_path / "got", calib, CFG, progress=False)
    with pytest.raises(FileExistsError, match="remove it or give another dst"):  # before any quantization
        quantize_pretrained(tmp_path / "src", lambda m: pytest.fail("calibrated"), CFG, dst=tmp_path / "ref")
    for dtype in (torch.int8, "float16"):
        with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
            quantize_pretrained(tmp_path / "src", calib, CFG, dtype=dtype)


def test_quant_speed_variant_parses_config_fields_and_names_bad_ones() -> None:
    """benchmarks/quant_speed.py --variant: each value takes its field's type; an unknown field, a
    value of the wrong type and an invalid config are refused with the field named."""
    import argparse
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quant_speed.py"
    spec = importlib.util.spec_from_file_location("quant_speed_bench", path)
    qs = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = qs
    try:
        spec.loader.exec_module(qs)
        label, cfg = qs.variant("scale_refit=true,cd_passes=2,percdamp=0.05,linear_group_size=64,skip=a.*|b")
        assert label == "scale_refit=true,cd_passes=2,percdamp=0.05,linear_group_size=64,skip=a.*|b"
        assert (cfg.scale_refit, cfg.cd_passes, cfg.percdamp, cfg.linear_group_size, cfg.skip) == \
            (True, 2, 0.05, 64, ("a.*", "b"))
        assert (cfg.bits, cfg.group_size, qs.W4.scale_refit) == (4, 128, False)  # W4 itself unchanged
        for bad, match in [("foo=1", "'foo=1' is not key=value"), ("cd_passes=x", "cd_passes takes an integer"),
                           ("scale_refit=yes", "scale_refit takes true or false"), ("bits=9", "bits must be")]:
            with pytest.raises(argparse.ArgumentTypeError, match=match):
                qs.variant(bad)
    finally:
        del sys.modules[spec.name]


def test_checkpoint_tensor_of_the_wrong_shape_is_named(tmp_path) -> None:
    """A tensor whose shape is not config.json's is refused by name before any calibration (it
    used to surface as an error blaming the calibration batch)."""
    from safetensors.torch import load_file, save_file
    model = _models()["llama"]
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight \[100, 64\] \(config.json: \[128, 64\]\)"):
        quantize_pretrained(tmp_path, lambda m: pytest.fail("calibrated"), CFG, progress=False)
