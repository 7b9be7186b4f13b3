"""Hugging Face models: calibration inputs, padding-aware Hessians, block-by-block calibration,
ignore / tied weights (tiny random BertConfig / LlamaConfig models, no downloads)."""
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

from adagrow.compress import OBSQuantizer, QuantConfig, QuantLinear, quantize  # noqa: E402
from adagrow.compress import model as model_mod  # noqa: E402

CFG = QuantConfig(bits=4, group_size=32, order="act")


def _bert(layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _llama(tie: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def _sentences(n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 120, (int(torch.randint(4, 13, (1,), generator=g)),), generator=g) for _ in range(n)]


def _padded(sents: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded batch with pad id 0, as a tokenizer returns it."""
    t = max(len(s) for s in sents)
    ids = torch.zeros(len(sents), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sents):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def _weights(qmodel: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.dequantize() for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}


def _hessians(monkeypatch, model, calib) -> dict[str, torch.Tensor]:
    """Quantize and record every layer's Hessian (H, nsamples) as quantize() built it."""
    seen = {}

    class Recording(OBSQuantizer):
        def quantize(self, *args, **kwargs):
            seen[self.name] = (self.H, self.nsamples)
            return super().quantize(*args, **kwargs)

    monkeypatch.setattr(model_mod, "OBSQuantizer", Recording)
    quantize(model, calib, QuantConfig(bits=8, group_size=32, order="act"), progress=False)
    return seen


def test_padded_positions_never_enter_a_hessian(monkeypatch) -> None:
    bert, sents = _bert(), _sentences()
    padded = _hessians(monkeypatch, bert, [_padded(sents[:3]), _padded(sents[3:])])
    one_by_one = _hessians(monkeypatch, bert, [{"input_ids": s[None]} for s in sents])
    assert len(padded) == 13 and padded.keys() == one_by_one.keys()  # 2 x 6 encoder Linears + pooler
    tokens = sum(len(s) for s in sents)
    for name, (h, n) in padded.items():
        h1, n1 = one_by_one[name]
        expected = len(sents) if name == "pooler.dense" else tokens
        assert n == n1 == expected, name
        assert _close(h, h1), name
    # without the mask the padding enters (both checks above can fail)
    ids_only = _hessians(monkeypatch, bert, [{"input_ids": _padded(sents)["input_ids"]}])
    assert ids_only["encoder.layer.0.attention.self.query"][1] > tokens
    assert not _close(ids_only["encoder.layer.1.output.dense"][0], one_by_one["encoder.layer.1.output.dense"][0])


def _close(h: torch.Tensor, ref: torch.Tensor) -> bool:
    """Hessians equal up to float summation order, including the order's effect on the quantized
    prefix: batching changes the order, and a rounding tie can move one 8-bit code by 1 (seen on
    some CPUs), which moves later layers' Hessians by ~1e-4 of their scale; a padded position
    entering moves them by O(1)."""
    return torch.allclose(h, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_calibration_input_forms_agree() -> None:
    bert, sents = _bert(), _sentences()
    batch = _padded(sents)
    ref = _weights(quantize(bert, [batch], CFG, progress=False))
    assert len(ref) == 13
    enc = transformers.BatchEncoding(batch)
    for calib in ([enc], [(batch,)], lambda m: m(**batch)):
        got = _weights(quantize(bert, calib, CFG, progress=False))
        assert all(torch.equal(got[n], ref[n]) for n in ref)
    ids = _weights(quantize(bert, [batch["input_ids"]], CFG, progress=False))
    pair = _weights(quantize(bert, [(batch["input_ids"], torch.zeros(len(sents)))], CFG, progress=False))
    assert all(torch.equal(ids[n], pair[n]) for n in ids)
    assert not torch.equal(ids["encoder.layer.1.output.dense"], ref["encoder.layer.1.output.dense"])  # mask used
    with pytest.raises(ValueError, match="attention_mask\\)-like tuple.*Pass a dict"):
        quantize(bert, [(batch["input_ids"], batch["attention_mask"])], CFG, progress=False)
    with pytest.raises(TypeError, match="calibration batch 0: expected a tensor.*got str"):
        quantize(bert, ["some text"], CFG, progress=False)
    with pytest.raises(ValueError, match="forward_loop\\(model\\) never called the model"):
        quantize(bert, lambda m: None, CFG, progress=False)


def test_block_by_block_forward_calls_linear_in_depth() -> None:
    def block_calls(layers: int) -> int:
        bert = _bert(layers)
        count = [0]
        for layer in bert.encoder.layer:
            layer.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
        q = quantize(bert, [_padded(_sentences(4)), _padded(_sentences(4, seed=2))], CFG, progress=False,
                     inplace=True)
        assert q is bert and q.adagrow_quant["blocks"] == [f"encoder.layer.{i}" for i in range(layers)]
        return count[0]

    c2, c4, c8 = block_calls(2), block_calls(4), block_calls(8)
    assert c8 - c4 == 2 * (c4 - c2)  # linear in depth (the whole-model scheme is quadratic)
    # per block and batch: 4 group passes (q/k/v share one, attention output, intermediate,
    # output) and 1 output pass of the quantized block, 1 pass of its float copy (float_target, the
    # hooks travel with the copy); per block, 1 whole-model pass of the first sample (the probe, also
    # the check that the batches fit). The pooler is calibrated from the last block's outputs, the
    # blocks skipped.
    assert c4 - c2 == 2 * (2 * (4 + 1 + 1) + 1)


def test_lm_head_left_float_and_tied_weights_stay_tied() -> None:
    batch = _padded(_sentences())
    for tie in (True, False):
        llama = _llama(tie)
        q = quantize(llama, [batch], CFG, progress=False)
        assert type(q.lm_head) is torch.nn.Linear
        assert (q.lm_head.weight is q.model.embed_tokens.weight) == tie
        assert q.adagrow_quant["float"] == {"lm_head": "ignore"}
        assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 14  # 2 x (4 attention + 3 MLP)
        assert q.adagrow_quant["blocks"] == ["model.layers.0", "model.layers.1"]
    q = quantize(_llama(True), [batch], QuantConfig(bits=4, group_size=32, ignore=()), progress=False)
    assert q.adagrow_quant["float"] == {"lm_head": "tied weight"} and q.lm_head.weight is q.model.embed_tokens.weight
    q = quantize(_llama(False), [batch], QuantConfig(bits=4, group_size=32, ignore=()), progress=False)
    assert isinstance(q.lm_head, QuantLinear)


# ---- server checkpoints: compressed-tensors pack-quantized and GPTQ v1 ----

_QUANTIZED: dict = {}


def _quantized(arch: str, sym: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny model quantized at W4 g32 by OBS (cached across tests) and a calibration batch."""
    if (arch, sym) not in _QUANTIZED:
        model = _bert() if arch == "bert" else _llama(tie=True)
        batch = _padded(_sentences())
        q = quantize(model, [batch], QuantConfig(bits=4, group_size=32, sym=sym, order="act"), progress=False)
        _QUANTIZED[arch, sym] = (q, batch)
    return _QUANTIZED[arch, sym]


def _out(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_compressed_tensors_sym_loads_in_transformers(tmp_path, arch) -> None:
    pytest.importorskip("compressed_tensors", reason="needs the hf extra (compressed-tensors)")
    from compressed_tensors.quantization import QuantizationConfig
    from adagrow.compress import save_compressed
    q, batch = _quantized(arch, sym=True)
    save_compressed(q, tmp_path)
    auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(q)
    ref = _out(q, batch)
    assert (_out(loaded, batch) - ref).abs().max() < 1e-5
    # config.json round-trips: the model config, and a quantization_config compressed-tensors parses
    cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    skip = {"quantization_config", "architectures", "transformers_version", "_name_or_path", "dtype"}
    assert {k: v for k, v in cfg.to_dict().items() if k not in skip} == \
        {k: v for k, v in q.config.to_dict().items() if k not in skip}
    qc = QuantizationConfig.model_validate(cfg.quantization_config)
    w = qc.config_groups["group_0"].weights
    assert (qc.format, w.num_bits, w.group_size, w.symmetric, w.strategy) == ("pack-quantized", 4, 32, True, "group")
    if arch == "llama":  # tied head: float, listed as ignored, still tied after loading
        assert qc.ignore == ["lm_head"] and loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_compressed_tensors_asym_decompressor_is_exact(tmp_path, arch) -> None:
    pytest.importorskip("compressed_tensors", reason="needs the hf extra (compressed-tensors)")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from adagrow.compress import save_compressed
    import json
    q, _ = _quantized(arch, sym=False)
    save_compressed(q, tmp_path)
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    assert scheme.weights.symmetric is False
    tensors = load_file(tmp_path / "model.safetensors")
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == (13 if arch == "bert" else 14)
    for name, m in layers.items():
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
        assert set(local) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "bias"} - \
            ({"bias"} if m.bias is None else set())
        assert torch.equal(PackedQuantizationCompressor.decompress(local, scheme)["weight"], m.dequantize()), name


@pytest.mark.parametrize("bits", range(2, 9))
def test_dense_packing_matches_compressed_tensors(bits) -> None:
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from adagrow.compress.server_formats import pack_dense, unpack_dense
    codes = torch.randint(0, 2**bits, (5, 72))
    codes[0] = 2**bits - 1
    packed = pack_dense(codes, bits)
    assert torch.equal(packed, ct.pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits))
    assert torch.equal(unpack_dense(packed, bits, 72), codes)


def _gptq_reference(qweight, qzeros, scales, g_idx, bits: int) -> torch.Tensor:
    """GPTQ v1 dequantization as GPTQ's reference kernels do it (bits dividing 32):
    w[n, k] = (q[k, n] - (qzeros[g, n] + 1)) * scales[g, n], g = g_idx[k]."""
    per, mask = 32 // bits, 2**bits - 1
    shifts = torch.arange(per) * bits
    q = ((qweight.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qweight.shape[1])
    z = ((qzeros.to(torch.int64)[:, :, None] >> shifts[None, None, :]) & mask).reshape(qzeros.shape[0], -1)
    g = g_idx.long()
    return ((q[: len(g)] - (z[g, : q.shape[1]] + 1)) * scales.float()[g]).t()


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_v1_layout(tmp_path, sym) -> None:
    from safetensors.torch import load_file
    from adagrow.compress import save_compressed
    import json
    q, _ = _quantized("bert", sym)
    save_compressed(q, tmp_path, format="gptq")
    tensors = load_file(tmp_path / "model.safetensors")
    qcfg = json.loads((tmp_path / "quantize_config.json").read_text())
    assert qcfg == json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["desc_act"]) == (4, 32, sym, False)
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            assert torch.equal(t["qweight"], m.qweight) and torch.equal(t["scales"], m.scales)  # bit-identical
            assert torch.equal(_gptq_reference(**t, bits=4), m.dequantize()), name
            assert f"{name}.weight" not in tensors


def test_save_pretrained_writes_loadable_folder_or_raises(tmp_path) -> None:
    pytest.importorskip("compressed_tensors", reason="needs the hf extra (compressed-tensors)")
    q, batch = _quantized("bert", sym=True)
    q.save_pretrained(tmp_path / "m")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "m").eval()
    assert (_out(loaded, batch) - _out(q, batch)).abs().max() < 1e-5
    with pytest.raises(FileExistsError, match="overwrite=True"):
        q.save_pretrained(tmp_path / "m")
    with pytest.raises(TypeError, match="unsupported arguments: \\['push_to_hub'\\]"):
        q.save_pretrained(tmp_path / "n", push_to_hub=True)
    assert not (tmp_path / "n").exists()
    from adagrow.compress import save_compressed
    from adagrow.grow.nets import RepCNN
    from adagrow.grow.reparam import reparameterize
    cnn = quantize(reparameterize(RepCNN(widths=(8, 12), depth=1, stem_width=4).eval()),
                   [torch.randn(4, 1, 11, 11)], QuantConfig(bits=4, group_size="tier"), progress=False)
    with pytest.raises(ValueError, match="conv layers .* use adagrow.compress.save_quantized"):
        save_compressed(cnn, tmp_path / "cnn")


def test_load_quantized_rebuilds_hf_model_from_its_config(tmp_path) -> None:
    from adagrow.compress import load_quantized, save_quantized
    from adagrow.compress.io import read_metadata
    for arch in ("bert", "llama"):
        q, batch = _quantized(arch, sym=True)
        path = save_quantized(q, tmp_path / f"{arch}.safetensors")
        assert read_metadata(path)["arch"]["name"] == "hf"
        rebuilt = load_quantized(path)  # no model=
        assert type(rebuilt) is type(q) and torch.equal(_out(rebuilt, batch), _out(q, batch))
    from adagrow.archs import build_arch
    record = read_metadata(path)["arch"]
    record["args"]["config"]["trust_remote_code"] = True
    with pytest.raises(ValueError, match="arch.args.config"):
        build_arch(record, "x.safetensors")


def _hf_folder(tmp_path) -> tuple:
    """A tiny BERT with a word-level tokenizer saved as a Hugging Face folder, and a calibration file."""
    words = "the a cat dog sat ran on under mat sofa quickly slowly today yesterday and with red blue".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = transformers.BertTokenizer(vocab_file=str(vocab))
    model = _bert()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g))
             for n in torch.randint(3, 12, (24,), generator=g)]
    (tmp_path / "calib.txt").write_text("\n".join(lines) + "\n\n")
    return tmp_path / "model", tmp_path / "calib.txt", tok


def test_cli_quantize_hf_writes_a_server_folder(tmp_path, capsys) -> None:
    pytest.importorskip("compressed_tensors", reason="needs the hf extra (compressed-tensors)")
    import json
    from adagrow.cli import main
    model_dir, calib, tok = _hf_folder(tmp_path)
    out = tmp_path / "ct"
    argv = ["quantize", "--hf", str(model_dir), "--calib-text", str(calib), "--out", str(out), "--group-size", "32",
            "--sym", "--format", "compressed-tensors", "--quiet", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["calib_sentences"] == 24 and res["quantized_layers"] == 13 and res["calib_embedding_cosine"] > 0.95
    loaded = transformers.AutoModel.from_pretrained(out).eval()
    batch = dict(transformers.AutoTokenizer.from_pretrained(out)(["the cat sat on the mat"], return_tensors="pt"))
    ref = transformers.AutoModel.from_pretrained(model_dir).eval()
    err = float((_out(loaded, batch) - _out(ref, batch)).norm() / _out(ref, batch).norm())
    assert 0 < err < 0.1  # quantized (not the float weights), close to float
    assert main(argv) == 2 and "overwrite" in capsys.readouterr().err  # nothing replaced without --overwrite
    assert main(["quantize", "--hf", str(model_dir), "--out", str(tmp_path / "x.safetensors"), "--calib", "64",
                 "--group-size", "32", "--quiet", "--json"]) == 0  # no --calib-text: the bundled sentences
    res = json.loads(capsys.readouterr().out)
    assert res["calib_text"].startswith("the first 64 lines of adagrow.hf_text.calibration_text('both') (")
    assert res["calib_sentences"] == 64
    assert res["calib_tokens"] > 64  # an encoder calibrates on the bundled sentences (a causal LM on the prose)
    from adagrow.cli import _bundled_calibration
    from adagrow.hf_text import CALIBRATION, CALIBRATION_PROSE
    # without --calib an encoder gets every bundled sentence, then every paragraph; --calib N the first N
    assert _bundled_calibration(False, None)[0] == CALIBRATION + CALIBRATION_PROSE
    assert _bundled_calibration(True, None)[0] == CALIBRATION_PROSE
    assert main(["quantize", "--hf", str(model_dir), "--calib-text", str(calib), "--out", str(tmp_path / "y"),
                 "--group-size", "tier"]) == 2
    assert "Linear layers take -1 or a multiple of 8" in capsys.readouterr().err
    assert (tmp_path / "x.safetensors").exists() and not (tmp_path / "y").exists()


def test_bundled_text_is_disjoint_and_installed() -> None:
    """The calibration and held-out sentences ship as package data and never overlap."""
    from adagrow.hf_text import CALIBRATION, HELD_OUT
    assert len(CALIBRATION) == len(set(CALIBRATION)) >= 500
    assert len(HELD_OUT) == len(set(HELD_OUT)) == 40
    assert not set(CALIBRATION) & set(HELD_OUT)


def _grams(text: str, n: int = 6) -> set[tuple[str, ...]]:
    """The ``n``-word sequences of ``text`` (lower case, punctuation dropped)."""
    import re
    words = re.sub(r"\W+", " ", text.lower()).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_held_out_prose_shares_no_six_words_with_calibration() -> None:
    """The LM perplexity text: 20 paragraphs of running prose, no 6-word sequence of the calibration text."""
    from adagrow.hf_text import CALIBRATION, HELD_OUT_PROSE
    assert len(HELD_OUT_PROSE) == 20 and all(len(p.split()) > 100 for p in HELD_OUT_PROSE)
    assert not _grams("\n".join(HELD_OUT_PROSE)) & set().union(*map(_grams, CALIBRATION))


def test_calibration_prose_is_distinct_and_shares_no_six_words_with_held_out() -> None:
    """The calibration prose: >= 256 distinct paragraphs of 60-120 words, no 6-word sequence (the
    issue asks for none of 8) of either held-out text."""
    from adagrow.hf_text import CALIBRATION_PROSE, HELD_OUT, HELD_OUT_PROSE
    assert len(CALIBRATION_PROSE) == len(set(CALIBRATION_PROSE)) >= 256
    assert all(60 <= len(p.split()) <= 120 for p in CALIBRATION_PROSE)
    held = _grams("\n".join(HELD_OUT_PROSE)).union(*map(_grams, HELD_OUT))
    assert not held & set().union(*map(_grams, CALIBRATION_PROSE))


def test_python_docs_is_prose_disjoint_from_calibration_or_a_clear_error(monkeypatch) -> None:
    """The third held-out text: >= 100 prose paragraphs of the interpreter's own reference docs
    (no code listings, no grammar rules), sharing no 8-word sequence with either calibration text;
    an interpreter without ``pydoc_data`` gets an error naming it, not an empty set."""
    from adagrow.hf_text import CALIBRATION, CALIBRATION_PROSE, python_docs
    docs = python_docs()
    assert len(docs) == len(set(docs)) >= 100
    assert all(300 <= len(p) <= 900 and p[0].isupper() and p.endswith(".") and ">>>" not in p and "::=" not in p
               for p in docs)
    calib = set().union(*(_grams(t, 8) for t in CALIBRATION + CALIBRATION_PROSE))
    assert not set().union(*(_grams(p, 8) for p in docs)) & calib
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    with pytest.raises(RuntimeError, match="pydoc_data"):
        python_docs()


def test_split_sentences_cuts_at_sentence_ends_only() -> None:
    """A sentence ends at . ! or ? (with a closing quote) before a capital or an opening quote; not
    inside a number, before a lower-case word, or at a comma inside a quotation."""
    from adagrow.hf_text import split_sentences
    text = ('Prices rose 0.4 percent. "We know," she said, "it is late." Work starts soon! '
            'Is it? yes, it is. "Fine." Done.')
    assert split_sentences(text) == ["Prices rose 0.4 percent.", '"We know," she said, "it is late."',
                                     "Work starts soon!", "Is it? yes, it is.", '"Fine."', "Done."]
    assert split_sentences("  One sentence without an end  ") == ["One sentence without an end"]


def test_calibration_text_names_the_bundled_texts() -> None:
    from adagrow.hf_text import CALIBRATION, CALIBRATION_PROSE, calibration_text
    assert calibration_text("sentences") == CALIBRATION and calibration_text("prose") == CALIBRATION_PROSE
    both = calibration_text("both", held_back=64)
    assert both == CALIBRATION[:-64] + CALIBRATION_PROSE and CALIBRATION[-1] not in both
    split = calibration_text("prose_sentences")
    assert calibration_text("both_sentences", held_back=64) == CALIBRATION[:-64] + split
    assert len(split) == 1327 and " ".join(split) == " ".join(CALIBRATION_PROSE)  # every word kept, in order
    with pytest.raises(ValueError, match="expected one of"):
        calibration_text("paragraphs")
    with pytest.raises(ValueError, match="held_back"):
        calibration_text("sentences", held_back=len(CALIBRATION))


def test_layers_fed_one_input_share_one_replay_and_hessian(monkeypatch) -> None:
    """Llama: q/k/v and gate/up are found by their identical input tensor; each group is
    calibrated once and its layers get the very same Hessian, equal to a one-layer run's."""
    from adagrow.compress.blocks import Probe
    from adagrow.compress.model import input_groups
    llama, batch = _llama(False), _padded(_sentences())
    probe = Probe(llama, {n: m for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear)}, [])
    probe.run(lambda: llama(**batch))
    layer0 = [n for n in probe.calls if n.startswith("model.layers.0.")]
    assert input_groups(layer0, probe.calls, probe.shares_input) == [
        [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"], ["model.layers.0.self_attn.o_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"], ["model.layers.0.mlp.down_proj"]]
    seen = _hessians(monkeypatch, _llama(False), [batch])
    qkv = [seen[f"model.layers.1.self_attn.{p}_proj"][0] for p in "qkv"]
    assert qkv[0] is qkv[1] is qkv[2]  # shared, not recomputed
    assert seen["model.layers.1.mlp.gate_proj"][0] is seen["model.layers.1.mlp.up_proj"][0]
    assert seen["model.layers.1.self_attn.o_proj"][0] is not qkv[0]


def test_down_projection_folds_its_float_target_from_the_float_outputs(monkeypatch) -> None:
    """BERT's output.dense (64 -> 32 here) has half as many outputs as inputs: the float pass keeps
    its outputs and OBS accumulates W C from them. With float64 statistics the quantized model
    equals the unfolded run's (C from the float inputs) to 1e-6, and the folded layers really took
    the output path."""
    from adagrow.compress import obs as obs_mod
    batch = _padded(_sentences())
    cfg = QuantConfig(bits=4, group_size=16, hessian_dtype="float64")
    outs = []
    real = obs_mod.OBSQuantizer.add_batch

    def spy(self, inp, target=None, float_out=None):
        outs.append((self.name, float_out is not None))
        return real(self, inp, target, float_out=float_out)

    monkeypatch.setattr(obs_mod.OBSQuantizer, "add_batch", spy)
    folded = _weights(quantize(_bert(), [batch], cfg, progress=False))
    assert {n for n, out in outs if out} == {f"encoder.layer.{i}.output.dense" for i in range(2)}
    monkeypatch.setattr(obs_mod, "folds_target", lambda *a: False)
    monkeypatch.setattr(model_mod, "folds_target", lambda *a: False)
    plain = _weights(quantize(_bert(), [batch], cfg, progress=False))
    assert folded.keys() == plain.keys()
    for name in folded:
        torch.testing.assert_close(folded[name], plain[name], rtol=1e-6, atol=1e-6)
