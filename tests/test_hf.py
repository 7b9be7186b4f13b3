"""Hugging Face models: calibration inputs, padding-aware Hessians, block-by-block calibration,
ignore / tied weights (tiny random BertConfig / LlamaConfig models, no downloads)."""
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
            seen[self.name] = (self.H.clone(), self.nsamples)
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
        assert torch.allclose(h, h1, rtol=1e-4, atol=1e-6 * float(h1.abs().max())), name
    # without the mask the padding enters (the check above can fail)
    ids_only = _hessians(monkeypatch, bert, [{"input_ids": _padded(sents)["input_ids"]}])
    assert ids_only["encoder.layer.0.attention.self.query"][1] > tokens


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
    # per block and batch: 6 layer passes + 1 output pass, + 2 whole-model passes (probe, pooler)
    assert c4 - c2 == 2 * 2 * (6 + 1 + 2)


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
