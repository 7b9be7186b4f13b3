"""Decoder LMs in ONNX with a KV cache, on tiny random Llamas: ONNX Runtime prefill + decode logits
equal PyTorch's, greedy tokens from the ORT loop equal ``generate()`` (fp32) and the quantized
PyTorch model's (W4 as MatMulNBits; INT8 weights dequantized at load, or 8-bit MatMulNBits), and what cannot be
exported is refused with the reason."""
import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

from adagrow.compress import QuantConfig, quantize, use_bf16_activations  # noqa: E402
from adagrow.compress.export import ExportCheckError, export_decoder_onnx, export_onnx, greedy_generate  # noqa: E402
from adagrow.compress.export.decoder import past_names, present_names  # noqa: E402
from adagrow.compress.export.tied import share_tied_embedding  # noqa: E402
from adagrow.compress.export.verify import ort_session  # noqa: E402

KW = dict(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)  # varied greedy tokens


def _llama(**extra) -> torch.nn.Module:
    """Hidden 96, GQA (4 heads, 2 key/value heads), tied head; eos 2."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**KW, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                   **extra)
    return transformers.LlamaForCausalLM(cfg).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 7 tokens, rows 1 and 2 left-padded by 2 and 4."""
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    return ids, mask


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> tuple[torch.nn.Module, str, object]:
    model = _llama()
    path = tmp_path_factory.mktemp("onnx") / "llama.onnx"
    return model, str(path), export_decoder_onnx(model, path)


def test_graph_has_cache_inputs_and_outputs_with_dynamic_axes(fp32) -> None:
    _, path, report = fp32
    graph = onnx.load(path).graph
    names = ["input_ids", "attention_mask", "position_ids", *past_names(2)]
    assert [i.name for i in graph.input] == names == report.inputs
    assert [o.name for o in graph.output] == ["logits", *present_names(2)] == report.outputs
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(graph.input[3]) == ["batch", 2, "past_sequence", 24]  # GQA: 2 key/value heads of 24
    assert dims(graph.output[1]) == ["batch", 2, "total_sequence", 24]
    assert report.passed and report.cosine > 0.99999 and report.max_abs_diff < 1e-4
    assert {c["shape"]["past_key_values.0.key"][2] for c in report.verification} == {0, 9}


def _vocab_matrices(path) -> list[str]:
    return [t.name for t in onnx.load(path).graph.initializer if sorted(t.dims) == [96, 128]]


def test_tied_embedding_is_stored_once(fp32) -> None:
    """The head's transposed weight serves the embedding's Gather too (the logits tests above run on
    that graph)."""
    assert len(_vocab_matrices(fp32[1])) == 1


@pytest.mark.parametrize("tied", [True, False])
def test_share_tied_embedding_computes_the_same_and_leaves_an_untied_head(tmp_path, tied: bool) -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((10, 3)).astype(np.float32)
    head = emb.T.copy() if tied else rng.standard_normal((3, 10)).astype(np.float32)
    mh = onnx.helper
    graph = mh.make_graph([mh.make_node("Gather", ["E", "ids"], ["x"]), mh.make_node("MatMul", ["x", "T"], ["y"])],
                          "g", [mh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b", "s"])],
                          [mh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", "s", 10])],
                          [onnx.numpy_helper.from_array(emb, "E"), onnx.numpy_helper.from_array(head, "T")])
    model = mh.make_model(graph, opset_imports=[mh.make_opsetid("", 17)])
    assert share_tied_embedding(model) == (["E"] if tied else [])
    assert [t.name for t in model.graph.initializer] == (["T"] if tied else ["E", "T"])
    ids = np.array([[1, 4, 9], [0, 0, 7]])
    onnx.save(model, tmp_path / "g.onnx")
    got = ort_session(tmp_path / "g.onnx").run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, emb[ids] @ head)


def test_ort_prefill_then_decode_logits_match_pytorch(fp32) -> None:
    """Prefill on an empty cache, then one token at a time on ORT's own cache: every step's logits
    equal the PyTorch model's on the whole sequence."""
    model, path, _ = fp32
    sess = ort_session(path)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    feed = {n: np.zeros((2, 2, 0, 24), np.float32) for n in past_names(2)}
    outs = sess.run(None, {**feed, "input_ids": ids[:, :8].numpy(), "attention_mask": np.ones((2, 8), np.int64),
                           "position_ids": np.tile(np.arange(8), (2, 1))})
    np.testing.assert_allclose(outs[0], ref[:, :8], atol=1e-4, rtol=0)
    for t in range(8, 12):
        feed = dict(zip(past_names(2), outs[1:]))
        outs = sess.run(None, {**feed, "input_ids": ids[:, t:t + 1].numpy(),
                               "attention_mask": np.ones((2, t + 1), np.int64), "position_ids": np.full((2, 1), t)})
        assert outs[1].shape == (2, 2, t + 1, 24)
        np.testing.assert_allclose(outs[0][:, 0], ref[:, t], atol=1e-4, rtol=0)


def test_ort_greedy_tokens_equal_generate(fp32) -> None:
    """Left-padded batch, end-of-sequence handling included: the same tokens as generate()."""
    model, path, _ = fp32
    ids, mask = _prompts()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=2)
    assert len({int(t) for t in ref[:, 7:].flatten()}) > 8  # not one repeated token
    got = greedy_generate(path, ids.numpy(), 16, attention_mask=mask.numpy(), eos_token_id=2)
    assert got.new_tokens == 16 and got.decode_tokens_per_s > 0
    np.testing.assert_array_equal(got.tokens, ref.numpy())


def test_w4_matmulnbits_greedy_tokens_equal_the_quantized_model(tmp_path) -> None:
    calib = [{"input_ids": torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(1))}]
    q = quantize(_llama(), calib, QuantConfig(bits=4, group_size=32, sym=True), progress=False)
    use_bf16_activations(q, False)  # the PyTorch reference in float32, not the CPU int4 kernel's bfloat16
    # accuracy level 0 (the default): MatMulNBits computes in fp32, the quantized model's arithmetic
    rep = export_decoder_onnx(q, tmp_path / "w4.onnx", "w4")
    ops = [n.op_type for n in onnx.load(tmp_path / "w4.onnx").graph.node]
    assert rep.quantized_weights == ops.count("MatMulNBits") == 14 and rep.cosine > 0.9999
    assert len(_vocab_matrices(tmp_path / "w4.onnx")) == 1  # the float head, tied: stored once
    ids, mask = _prompts()
    ref = q.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=2)
    got = greedy_generate(tmp_path / "w4.onnx", ids.numpy(), 16, attention_mask=mask.numpy(), eos_token_id=2)
    np.testing.assert_array_equal(got.tokens, ref.numpy())
    # a float model is quantized by the export itself (RTN here); int8 compute stays within the W4 threshold
    rep4 = export_decoder_onnx(_llama(), tmp_path / "rtn.onnx", "w4", quant_config=QuantConfig(method="rtn"),
                               accuracy_level=4)
    assert rep4.quantized_weights == 14 and rep4.cosine >= rep4.threshold and not rep4.notes


def test_int8_weights_run_with_the_cache_and_follow_the_float_model(tmp_path) -> None:
    """INT8 Linear weights (int8 initializers that ONNX Runtime dequantizes at load, fp32 compute):
    ORT's prefill + decode logits equal a PyTorch model holding the same per-channel int8 weights,
    stay within the int8 threshold of the float model's, and greedy tokens mostly agree with the
    float model's; 8-bit MatMulNBits at accuracy level 1 holds the same weights."""
    from adagrow.compress.export.qdq import int8_codes
    from adagrow.onnxrt import cpu_session
    model = _llama()
    rep = export_decoder_onnx(model, tmp_path / "int8.onnx", "int8")
    graph = onnx.load(tmp_path / "int8.onnx").graph
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    casts = [n for n in graph.node if n.op_type == "Cast" and n.input[0] in int8]
    assert rep.quantized_weights == len(int8) == len(casts) == 14 and rep.notes
    assert not any(n.op_type in ("MatMulNBits", "DequantizeLinear") for n in graph.node)
    assert len(_vocab_matrices(tmp_path / "int8.onnx")) == 1  # the float head, tied: stored once
    cpu_session(tmp_path / "int8.onnx", optimized_path=str(tmp_path / "opt.onnx"))  # folded once, at load
    folded = onnx.load(tmp_path / "opt.onnx").graph
    assert not any(n.op_type == "Cast" and n.input[0] in int8 for n in folded.node)
    assert sum(n.op_type == "MatMul" for n in folded.node) >= 14
    rep1 = export_decoder_onnx(model, tmp_path / "nbits.onnx", "int8", accuracy_level=1)
    nbits = [n for n in onnx.load(tmp_path / "nbits.onnx").graph.node if n.op_type == "MatMulNBits"]
    assert rep1.quantized_weights == len(nbits) == 14
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {8}
    assert rep1.cosine == pytest.approx(rep.cosine, abs=1e-6)  # fp32 compute on the same int8 weights
    assert rep.passed and rep.threshold == 0.99 <= rep.cosine < 0.99999  # quantized, not float
    twin = _llama()
    with torch.no_grad():  # the same int8 grid in PyTorch: per output channel, symmetric, |q| <= 127
        for name, m in twin.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                q, s = int8_codes(m.weight.numpy(), None, axis=0)
                assert np.abs(q).max() == 127
                m.weight.copy_(torch.from_numpy(q.astype(np.float32) * s[:, None]))
    sess = ort_session(tmp_path / "int8.onnx")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, float_ref = twin(input_ids=ids).logits.numpy(), model(input_ids=ids).logits.numpy()
    feed = {n: np.zeros((2, 2, 0, 24), np.float32) for n in past_names(2)}
    outs = sess.run(None, {**feed, "input_ids": ids[:, :8].numpy(), "attention_mask": np.ones((2, 8), np.int64),
                           "position_ids": np.tile(np.arange(8), (2, 1))})
    steps = [outs[0]]
    for t in range(8, 12):
        outs = sess.run(None, {**dict(zip(past_names(2), outs[1:])), "input_ids": ids[:, t:t + 1].numpy(),
                               "attention_mask": np.ones((2, t + 1), np.int64), "position_ids": np.full((2, 1), t)})
        steps.append(outs[0])
    got = np.concatenate(steps, 1)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.abs(got - float_ref).max() > 1e-3  # the weights did change
    cos = (got * float_ref).sum() / np.linalg.norm(got) / np.linalg.norm(float_ref)
    assert cos >= rep.threshold
    # next-token choices on the same 24 positions: the int8 graph picks the float model's on most
    agree = (got.argmax(-1) == float_ref.argmax(-1)).mean()
    assert agree >= 0.9
    prompts, mask = _prompts()  # greedy generation: token for token the int8 PyTorch model's
    ref_tokens = twin.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=16, do_sample=False,
                               pad_token_id=2)
    got = greedy_generate(tmp_path / "int8.onnx", prompts.numpy(), 16, attention_mask=mask.numpy(), eos_token_id=2)
    np.testing.assert_array_equal(got.tokens, ref_tokens.numpy())


def test_refuses_what_it_cannot_export(tmp_path, fp32) -> None:
    with pytest.raises(ValueError, match="LlamaModel is not a causal LM"):
        export_decoder_onnx(transformers.LlamaModel(_llama().config), tmp_path / "a.onnx")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model_type 'gpt2'.* not supported.*supported: llama"):
        export_decoder_onnx(gpt2, tmp_path / "b.onnx")
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(**KW, sliding_window=64))
    with pytest.raises(ValueError, match="sliding-window attention"):
        export_decoder_onnx(mistral, tmp_path / "c.onnx")
    with pytest.raises(TypeError, match="needs a Hugging Face causal LM"):
        export_decoder_onnx(torch.nn.Linear(4, 4), tmp_path / "d.onnx")
    model, path, _ = fp32
    with pytest.raises(FileExistsError):
        export_decoder_onnx(model, path)
    with pytest.raises(ValueError, match="w4 export with OBS needs calibration"):
        export_decoder_onnx(model, tmp_path / "e.onnx", "w4")
    rtn = quantize(model, None, QuantConfig(method="rtn"), progress=False)
    with pytest.raises(ValueError, match="holds quantized layers: export precision='w4'"):
        export_decoder_onnx(rtn, tmp_path / "e.onnx")
    plain = tmp_path / "plain.onnx"  # a logits-only export has no cache to generate with
    export_onnx(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.randn(2, 4), plain, progress=False)
    with pytest.raises(ValueError, match="not a KV-cache decoder export"):
        greedy_generate(plain, np.zeros((1, 3), np.int64), 4)
    assert not any(tmp_path.glob("[a-e].onnx"))


def test_a_wrong_graph_is_not_written(tmp_path, monkeypatch) -> None:
    """The ORT check compares against PyTorch: a graph that drifts from the model raises."""
    import adagrow.compress.export.decoder as dec
    real = dec._export_graph

    def drifted(fwd, opset, report):  # the first layer's MLP output scaled by 1.5 in the graph only
        mlp = fwd.model.model.layers[0].mlp.down_proj
        with torch.no_grad():
            mlp.weight.mul_(1.5)
        try:
            return real(fwd, opset, report)
        finally:
            with torch.no_grad():
                mlp.weight.div_(1.5)
    monkeypatch.setattr(dec, "_export_graph", drifted)
    with pytest.raises(ExportCheckError, match="fp32 export FAILED verification"):
        export_decoder_onnx(_llama(), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def _folder(tmp_path, model: torch.nn.Module):
    """``model`` saved with a small word-level tokenizer (load_hf wants tokenizer files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["the", "weather", "is", "nice", "today", "and", "we", "went", "to", "park"]
    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}},
                                    unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="</s>").save_pretrained(folder)
    return folder


def test_cli_exports_causal_lms_with_a_kv_cache(tmp_path, capsys) -> None:
    """``adagrow export --hf`` on a float folder (fp32, int8) and on the compressed-tensors folder of
    ``adagrow quantize --hf`` (w4); an adagrow LM checkpoint with ``--precision w4``."""
    import json
    from adagrow.cli import main
    from adagrow.compress import save_compressed, save_quantized
    pytest.importorskip("compressed_tensors", reason="needs the hf extra (compressed-tensors)")
    model = _llama()
    folder = _folder(tmp_path, model)
    argv = ["export", "--json", "--quiet"]
    assert main(argv + ["--hf", str(folder), "--out", str(tmp_path / "fp32.onnx")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kv_cache"] and res["greedy_identical"].startswith("3/3") and res["cosine"] > 0.9999
    assert main(argv + ["--hf", str(folder), "--precision", "int8", "--out", str(tmp_path / "int8.onnx")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["precision"] == "int8" and 0.99 <= res["cosine"] < 0.99999
    assert main(argv + ["--hf", str(folder), "--precision", "w4", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "holds a float model: quantize it first" in capsys.readouterr().err
    q = quantize(model, None, QuantConfig(method="rtn", group_size=32, sym=True), progress=False)
    save_compressed(q, tmp_path / "ct", tokenizer=transformers.AutoTokenizer.from_pretrained(folder))
    assert main(argv + ["--hf", str(tmp_path / "ct"), "--precision", "w4", "--out", str(tmp_path / "ct.onnx")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["precision"] == "w4" and res["cosine"] > 0.99
    assert res["greedy_identical"].startswith("3/3") and "float32 numerics" in res["greedy_identical"]
    assert [n.op_type for n in onnx.load(tmp_path / "ct.onnx").graph.node].count("MatMulNBits") == 14
    save_quantized(q, tmp_path / "q.safetensors")
    assert main(argv + [str(tmp_path / "q.safetensors"), "--precision", "w4", "--out", str(tmp_path / "q.onnx")]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache"]
    assert not (tmp_path / "x.onnx").exists()
