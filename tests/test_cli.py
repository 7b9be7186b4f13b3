"""The adagrow CLI: every subcommand's happy path, bad input, bench skips, demo --fast outputs."""
import json

import numpy as np
import pytest

from adagrow.cli import main


def _run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    data = json.loads(out) if rc == 0 and "--json" in argv else None
    return rc, data, err


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "grown.safetensors"
    assert main(["grow", "--family", "resnet", "--epochs", "2", "--size", "8", "--out", str(path), "--quiet"]) == 0
    return path


def test_grow_reparam_quantize_export(grown, tmp_path, capsys) -> None:
    rc, data, _ = _run(capsys, "grow", "--family", "vgg", "--epochs", "2", "--size", "8", "--stop", "VGG-1-0-0",
                       "--out", str(tmp_path / "g.safetensors"), "--quiet", "--json")
    assert rc == 0 and data["spec"].startswith("VGG-") and (tmp_path / "g.safetensors").exists()
    rc, data, _ = _run(capsys, "reparam", str(grown), "--size", "8", "--out", str(tmp_path / "d.safetensors"),
                       "--json")
    assert rc == 0 and data["max_abs_diff_vs_train_form"] < 1e-3
    rc, data, _ = _run(capsys, "quantize", str(tmp_path / "d.safetensors"), "--size", "8", "--bits", "4",
                       "--calib", "128", "--out", str(tmp_path / "q.safetensors"), "--quiet", "--json")
    assert rc == 0 and data["config"]["group_size"] == "tier" and abs(data["quant_acc"] - data["float_acc"]) < 0.2
    for prec, ckpt in (("fp32", grown), ("int8", grown), ("w4", tmp_path / "q.safetensors")):
        out = tmp_path / f"m_{prec}.onnx"
        rc, data, _ = _run(capsys, "export", str(ckpt), "--size", "8", "--precision", prec, "--out", str(out),
                           "--quiet", "--json", *(["--triton-repo", str(tmp_path / "repo")] if prec == "fp32" else []))
        assert rc == 0 and out.exists() and data["cosine"] > 0.99, prec
    assert (tmp_path / "repo" / "model" / "config.pbtxt").exists()


def test_bench_reports_unavailable_backends(grown, tmp_path, capsys) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text(f'[suite]\nwarmup = 1\nruns = 3\nbatch_sizes = [1, 4]\nsize = 8\n\n'
                     f'[[model]]\nname = "cnn"\npath = "{grown}"\nbackends = ["eager", "ort-cpu", "ort-cuda", "tensorrt"]\n'
                     f'precisions = ["fp32", "int8"]\n')
    rc, data, _ = _run(capsys, "bench", str(suite), "--out", str(tmp_path / "r.json"), "--json", "--quiet")
    assert rc == 0
    rows = {(r["backend"], r["precision"], r["batch"]): r for r in data["rows"]}
    assert len(rows) == 4 * 2 * 2
    assert rows[("ort-cpu", "int8", 4)]["status"] == "ok" and rows[("ort-cpu", "int8", 4)]["median_ms"] > 0
    assert rows[("eager", "int8", 1)]["status"] == "skipped" and "INT8" in rows[("eager", "int8", 1)]["reason"]
    for key in (("ort-cuda", "fp32", 1), ("tensorrt", "fp32", 1)):
        assert rows[key]["status"] == "skipped" and rows[key]["reason"]
    rc, data, _ = _run(capsys, "bench", str(suite), "--compare", str(tmp_path / "r.json"), "--json", "--quiet")
    assert rc == 0 and len(data["compare"]) == 6 and all(" -> " in line for line in data["compare"])


def test_bad_input_errors(grown, tmp_path, capsys) -> None:
    rc, _, err = _run(capsys, "grow", "--data", "npz:/nope/x.npz", "--out", str(tmp_path / "a.safetensors"))
    assert rc == 2 and "npz file not found: /nope/x.npz" in err
    rc, _, err = _run(capsys, "grow", "--data", "cifar10:/nope", "--out", str(tmp_path / "a.safetensors"))
    assert rc == 2 and "CIFAR-10 folder not found" in err
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    rc, _, err = _run(capsys, "grow", "--data", f"npz:{tmp_path / 'bad.npz'}", "--out", str(tmp_path / "a.st"))
    assert rc == 2 and "not a readable .npz" in err
    np.savez(tmp_path / "layout.npz", x=np.zeros((4, 2)), y=np.zeros(4))
    rc, _, err = _run(capsys, "grow", "--data", f"npz:{tmp_path / 'layout.npz'}", "--out", str(tmp_path / "a.st"))
    assert rc == 2 and "must be [N, C, H, W]" in err
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "data_batch_1").write_bytes(b"junk")
    rc, _, err = _run(capsys, "grow", "--data", f"cifar10:{tmp_path / 'cifar'}", "--out", str(tmp_path / "a.st"))
    assert rc == 2 and "data_batch_1" in err
    rc, _, err = _run(capsys, "grow", "--data", "mnist", "--out", str(tmp_path / "a.st"))
    assert rc == 2 and "unknown data source" in err
    rc, _, err = _run(capsys, "reparam", str(grown), "--size", "8", "--out", str(grown))
    assert rc == 2 and "--overwrite" in err
    rc, _, err = _run(capsys, "quantize", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "q.st"))
    assert rc == 2 and "not found" in err
    (tmp_path / "s.toml").write_text("[[model]]\nname = 'x'\npath = 'y.onnx'\nbackends = ['cuda-graphs']\n")
    rc, _, err = _run(capsys, "bench", str(tmp_path / "s.toml"))
    assert rc == 2 and "unknown backends" in err


def test_demo_fast_writes_every_output(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    rc = main(["demo", "--fast", "--out", str(out), "--quiet"])
    assert rc == 0
    for name in ("results.json", "results.md", "accuracy_vs_latency.png", "grown.safetensors",
                 "digits_w4_overlap.safetensors", "fp32.onnx", "int8_ort.onnx", "w4.onnx"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "results.json").read_text())
    methods = {(r["method"], r["precision"], r["backend"]) for r in result["table"]}
    assert len(methods) == 9 and all(0 <= r["accuracy"] <= 1 and r["cpu_latency_ms"] > 0 for r in result["table"])
    assert any(r["status"] == "skipped" for r in result["suite"]["rows"])
    assert main(["demo", "--fast", "--out", str(out), "--quiet"]) == 2  # refuses to overwrite
