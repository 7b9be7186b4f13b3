"""The adagrow CLI: every subcommand's happy path on a model that really grew, exact spec stops,
every bad input answered with a named error before anything is written, bench skips, demo --fast."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from adagrow.bench import unavailable
from adagrow.cli import main
from adagrow.grow import load_grown
from adagrow.grow.reparam import RepConv2d

SMALL = ["--size", "8", "--quiet"]


def _run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    data = json.loads(out) if rc == 0 and "--json" in argv else None
    return rc, data, err


def _usage_error(capsys, *argv: str) -> str:
    """argparse rejects the command line: exit status 2 and a message on stderr."""
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


def _raising(exc: Exception):
    def fail(*args, **kwargs):
        raise exc
    return fail


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A ResNet grown for 3 epochs (54 steps), a growth step every 12: two depth steps, one width step."""
    path = tmp_path_factory.mktemp("cli") / "grown.safetensors"
    assert main(["grow", "--family", "resnet", "--widths", "8,16,16", "--epochs", "3", "--interval", "12",
                 "--stop", "10000000", "--out", str(path), *SMALL]) == 0
    model = load_grown(path)
    assert sum(model.depths) == 2  # depth grew
    branches = [len(m.branches) for m in model.modules() if isinstance(m, RepConv2d)]
    assert max(branches) == 2 and sum(b == 2 for b in branches) >= 3  # width grew (70% of convs gained one)
    return path


def test_grow_reparam_quantize_export(grown, tmp_path, capsys) -> None:
    rc, data, _ = _run(capsys, "grow", "--widths", "8,8,8", "--epochs", "3", "--interval", "12", "--stop",
                       "VGG-1-0-0", "--out", str(tmp_path / "g.safetensors"), *SMALL, "--json")
    assert rc == 0 and data["spec"] == "VGG-1-0-0" and data["stop_reached"] and (tmp_path / "g.safetensors").exists()
    rc, data, _ = _run(capsys, "reparam", str(grown), "--out", str(tmp_path / "d.safetensors"), *SMALL, "--json")
    assert rc == 0 and data["max_abs_diff_vs_train_form"] < 1e-4
    rc, data, _ = _run(capsys, "quantize", str(tmp_path / "d.safetensors"), "--bits", "4", "--calib", "128",
                       "--out", str(tmp_path / "q.safetensors"), *SMALL, "--json")
    # measured: float 94.2%, W4 tier-group OBS 95.1% on the 449 test digits
    assert rc == 0 and data["config"]["group_size"] == "tier" and abs(data["quant_acc"] - data["float_acc"]) < 0.03
    assert data["config"]["float_target"] is True
    rc, plain, _ = _run(capsys, "quantize", str(tmp_path / "d.safetensors"), "--bits", "4", "--calib", "128",
                        "--no-float-target", "--out", str(tmp_path / "q_plain.safetensors"), *SMALL, "--json")
    assert rc == 0 and plain["config"]["float_target"] is False
    for prec, ckpt, cos in (("fp32", grown, 0.9999), ("int8", grown, 0.99), ("w4", tmp_path / "q.safetensors", 0.99)):
        out = tmp_path / f"m_{prec}.onnx"
        rc, data, err = _run(capsys, "export", str(ckpt), "--precision", prec, "--out", str(out), *SMALL, "--json",
                             *(["--triton-repo", str(tmp_path / "repo")] if prec == "fp32" else []))
        assert rc == 0 and out.exists() and data["cosine"] > cos, (prec, err)
    model_dir = tmp_path / "repo" / "model"
    mask = _umask()  # files and folders readable by a server running as another user (umask 022: 644/755)
    for p in (model_dir, model_dir / "1"):
        assert p.stat().st_mode & 0o777 == 0o777 & ~mask, p
    for p in (model_dir / "config.pbtxt", model_dir / "1" / "model.onnx", tmp_path / "m_fp32.onnx",
              tmp_path / "q.safetensors"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


def test_grow_warns_when_the_stop_spec_is_not_reached(tmp_path, capsys) -> None:
    """One epoch of 18 steps with a growth step every 12 grows one layer: VGG-3-3-3 is out of reach."""
    argv = ["grow", "--widths", "8,8,8", "--epochs", "1", "--interval", "12", "--stop", "VGG-3-3-3", *SMALL,
            "--json"]
    rc, data, err = _run(capsys, *argv, "--out", str(tmp_path / "a.safetensors"))
    assert rc == 0 and data["spec"] != "VGG-3-3-3" and not data["stop_reached"] and len(data["growth"]) == 1
    assert f"warning: --stop VGG-3-3-3 not reached in 1 epochs: the model grew to {data['spec']}" in err
    rc, _, err = _run(capsys, *argv, "--strict", "--out", str(tmp_path / "b.safetensors"))
    assert rc == 2 and "nothing written (--strict)" in err and not (tmp_path / "b.safetensors").exists()


def _check_skips(rows: list[dict]) -> None:
    """Skips are named from what this machine lacks, checked independently of the bench's own
    availability logic; nothing errors."""
    import onnxruntime as ort
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        if r["backend"] == "ort-cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            assert r["status"] == "skipped" and "CUDAExecutionProvider" in r["reason"], r
        if r["backend"] == "tensorrt" and not has_trt:
            assert r["status"] == "skipped" and r["reason"] == "tensorrt is not installed", r
        if r["backend"] == "triton" and not torch.cuda.is_available():
            assert r["status"] == "skipped" and "CUDA GPU" in r["reason"], r
        if r["status"] == "skipped":
            assert r["reason"], r


def test_bench_reports_unavailable_backends(grown, tmp_path, capsys) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text(f'[suite]\nwarmup = 1\nruns = 3\nbatch_sizes = [1, 4]\nsize = 8\n\n'
                     f'[[model]]\nname = "cnn"\npath = "{grown}"\n'
                     f'backends = ["eager", "ort-cpu", "ort-cuda", "tensorrt"]\n'
                     f'precisions = ["fp32", "int8"]\n')
    rc, data, _ = _run(capsys, "bench", str(suite), "--out", str(tmp_path / "r.json"), "--json", "--quiet")
    assert rc == 0
    rows = {(r["backend"], r["precision"], r["batch"]): r for r in data["rows"]}
    assert len(rows) == 4 * 2 * 2
    assert rows[("ort-cpu", "int8", 4)]["status"] == "ok" and rows[("ort-cpu", "int8", 4)]["median_ms"] > 0
    assert rows[("eager", "int8", 1)]["status"] == "skipped" and "INT8" in rows[("eager", "int8", 1)]["reason"]
    _check_skips(data["rows"])
    for (backend, precision, _), row in rows.items():  # what this CPU machine can run, runs
        if backend == "ort-cpu" or (backend, precision) == ("eager", "fp32"):
            assert row["status"] == "ok" and row["median_ms"] > 0, row
    rc, data, _ = _run(capsys, "bench", str(suite), "--compare", str(tmp_path / "r.json"), "--json", "--quiet")
    n_ok = sum(r["status"] == "ok" for r in rows.values())
    assert rc == 0 and len(data["compare"]) == n_ok and all(" -> " in line for line in data["compare"])
    suite.write_text(suite.read_text().replace("size = 8", "size = 16"))  # not the grown input shape
    rc, _, err = _run(capsys, "bench", str(suite), "--quiet")
    assert rc == 2 and "was grown on inputs [1, 8, 8], but the suite's data / size give [1, 16, 16]" in err


def test_data_errors(tmp_path, capsys) -> None:
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
    assert not (tmp_path / "a.st").exists() and not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("argv,message", [
    (["grow", "--epochs", "0"], "argument --epochs: expected a positive int, got '0'"),
    (["grow", "--epochs", "-3"], "argument --epochs: expected a positive int, got '-3'"),
    (["grow", "--lr", "0"], "argument --lr: expected a positive float, got '0'"),
    (["grow", "--lr", "nan"], "argument --lr: expected a positive float, got 'nan'"),
    (["grow", "--lr", "inf"], "argument --lr: expected a positive float, got 'inf'"),
    (["grow", "--size", "0"], "argument --size: expected a positive int, got '0'"),
    (["grow", "--widths", "8,8"], "argument --widths: expected 3 or 4 positive channel counts"),
    (["grow", "--interval", "0"], "argument --interval: expected a positive int"),
    (["quantize", "c.safetensors", "--calib", "-5"], "argument --calib: expected a positive int, got '-5'"),
    (["quantize", "c.safetensors", "--calib", "0"], "argument --calib: expected a positive int, got '0'"),
    (["quantize", "c.safetensors", "--group-size", "12"], "argument --group-size: expected -1, a positive multiple"),
    (["quantize", "c.safetensors", "--group-size", "abc"], "argument --group-size: expected -1, a positive multiple"),
    (["quantize", "c.safetensors", "--bits", "9"], "argument --bits: invalid choice: 9"),
    (["export", "c.safetensors", "--calib", "-1"], "argument --calib: expected a positive int"),
    (["export", "c.safetensors", "--name", "../evil"], "argument --name: expected a plain folder name"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_usage_errors(capsys, argv, message) -> None:
    assert message in _usage_error(capsys, *argv, "--out", "x.safetensors")


def test_outputs_are_checked_before_any_work(grown, tmp_path, capsys) -> None:
    """Each refused command writes nothing (the folder holds only what the test put there)."""
    before = {"d"}
    (tmp_path / "d").mkdir()
    rc, _, err = _run(capsys, "quantize", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "d"))
    assert rc == 2 and f"{tmp_path / 'd'} is a directory" in err  # refused before reading the checkpoint
    rc, _, err = _run(capsys, "grow", "--out", str(tmp_path / "d"))
    assert rc == 2 and "is a directory" in err
    rc, _, err = _run(capsys, "demo", "--out", str(grown))
    assert rc == 2 and f"{grown} is a file" in err
    for extra in ((), ("--overwrite",)):  # the input itself is never the output
        rc, _, err = _run(capsys, "reparam", str(grown), "--out", str(grown), *extra, *SMALL)
        assert rc == 2 and f"--out {grown} is the input" in err
    rc, _, err = _run(capsys, "quantize", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "q.st"))
    assert rc == 2 and "not found" in err
    rc, _, err = _run(capsys, "quantize", str(grown), "--size", "16", "--out", str(tmp_path / "q.st"), "--quiet")
    assert rc == 2 and "was grown on inputs [1, 8, 8], but --data digits --size 16 gives [1, 16, 16]" in err
    rc, _, err = _run(capsys, "grow", "--stop", "VGG-1-0", "--out", str(tmp_path / "g.st"), *SMALL)
    assert rc == 2 and "spec 'VGG-1-0' does not fit" in err
    rc, _, err = _run(capsys, "grow", "--family", "vit", "--widths", "8,8,8", "--out", str(tmp_path / "g.st"), *SMALL)
    assert rc == 2 and "--widths applies to the CNN families" in err
    (tmp_path / "repo" / "model").mkdir(parents=True)
    before.add("repo")
    rc, _, err = _run(capsys, "export", str(grown), "--out", str(tmp_path / "m.onnx"), "--triton-repo",
                      str(tmp_path / "repo"), *SMALL)
    assert rc == 2 and "repo/model exists; pass --overwrite" in err
    if unavailable("tensorrt", "fp32", "grown") is not None:  # no TensorRT or no GPU here
        rc, _, err = _run(capsys, "export", str(grown), "--out", str(tmp_path / "m.onnx"), "--engine",
                          str(tmp_path / "m.plan"), *SMALL)
        assert rc == 2 and "TensorRT" in err
    rc, _, err = _run(capsys, "export", str(grown), "--out", str(grown / "x.onnx"), *SMALL)
    assert rc == 2 and f"{grown} is a file, not a folder" in err
    assert {p.name for p in tmp_path.iterdir()} == before and list((tmp_path / "repo" / "model").iterdir()) == []


@pytest.mark.parametrize("suite,message", [
    ("runs = 0", r"field suite.runs: 0 is less than the minimum of 1"),
    ("batch_sizes = [0, -1]", r"field suite.batch_sizes[0]: 0 is less than the minimum of 1"),
    ("batch_sizes = []", r"field suite.batch_sizes: [] should be non-empty"),
    ("warmup = 1.5", r"field suite.warmup: 1.5 is not of type 'integer'"),
    ("rusn = 3", r"field suite: Additional properties are not allowed ('rusn' was unexpected)"),
], ids=["runs-0", "batch-0", "batch-empty", "warmup-float", "suite-key"])
def test_bench_suite_errors(tmp_path, capsys, suite, message) -> None:
    (tmp_path / "s.toml").write_text(f'[suite]\n{suite}\n\n[[model]]\nname = "m"\npath = "m.onnx"\n')
    rc, _, err = _run(capsys, "bench", str(tmp_path / "s.toml"))
    assert rc == 2 and f"{tmp_path / 's.toml'}: " in err and message in err, err


def test_bench_model_errors(tmp_path, capsys) -> None:
    for model, message in [('name = "m"\npath = "m.onnx"\nbackends = ["cuda-graphs"]', "'cuda-graphs' is not one of"),
                           ('name = "m"\npath = "m.onnx"\nbackend = ["eager"]',
                            "field model[0]: Additional properties are not allowed ('backend' was unexpected)"),
                           ('name = "m"\npath = "m.onnx"\n[sweet]\nruns = 1',
                            "Additional properties are not allowed ('sweet' was unexpected)"),
                           ('name = "../m"\npath = "m.onnx"', "field model[0].name: '../m' does not match"),
                           ('name = "m"\npath = "m.onnx"\n\n[[model]]\nname = "m"\npath = "n.onnx"',
                            "duplicate model names ['m']")]:
        (tmp_path / "s.toml").write_text(f"[[model]]\n{model}\n")
        rc, _, err = _run(capsys, "bench", str(tmp_path / "s.toml"))
        assert rc == 2 and message in err, err


def test_demo_fast_writes_every_output(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    rc = main(["demo", "--fast", "--out", str(out), "--quiet"])
    assert rc == 0
    assert capsys.readouterr().out == f"adagrow demo: results in {out / 'results'}.md and results.json\n"
    for name in ("results.json", "results.md", "accuracy_vs_latency.png", "grown.safetensors",
                 "digits_w4_overlap.safetensors", "fp32.onnx", "int8_ort.onnx", "w4.onnx"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "results.json").read_text())
    acc = {(r["method"], r["precision"], r["backend"]): r["accuracy"] for r in result["table"]}
    assert len(acc) == 11 and all(r["cpu_latency_ms"] > 0 for r in result["table"])
    front = [r for r in result["table"] if r["pareto"]]
    assert front and all(not (o["cpu_latency_ms"] < r["cpu_latency_ms"] and o["accuracy"] > r["accuracy"])
                         for r in front for o in result["table"])
    flt = acc[("float (fused)", "FP32", "PyTorch eager")]
    # measured here (2-core AVX-512 CPU): float 98.4%, W8 98.4%, OBS W4 98.2-98.7%, OBS W3 97.6%,
    # RTN W4 80.0%, RTN W3 33.0%, INT8 Q/DQ 98.2%
    assert flt > 0.9
    assert acc[("float (fused)", "FP32", "ONNX Runtime CPU")] == pytest.approx(flt, abs=0.005)
    assert abs(acc[("OBS W8 weights + calibrated activations", "INT8 QDQ", "ONNX Runtime CPU")] - flt) < 0.03
    for (method, prec, _), a in acc.items():
        if not method.startswith("RTN") or prec == "W8":  # OBS holds at every width, RTN at W8
            assert abs(a - flt) < {"W8": 0.015, "W4": 0.03, "W3": 0.05}.get(prec, 0.03), (method, prec, a, flt)
    # the demo's point: on the grown model's spiky fused kernels round-to-nearest falls, OBS holds
    overlap = "OBS overlap-aware (reparam order, tier groups)"
    for prec in ("W4", "W3"):
        assert acc[("RTN per-channel", prec, "PyTorch eager")] < acc[(overlap, prec, "PyTorch eager")] - 0.10, prec
    assert max(k["peak_to_rms"] for k in result["kernels"]) > 8  # identity-like fused kernels
    _check_skips(result["suite"]["rows"])
    # one timing method: the suite ran with the table's warm-up, runs and threads, and the table's
    # float rows are the suite's records of the same (model, backend, precision, batch 1)
    assert {k: result["suite"][k] for k in ("warmup", "runs", "threads")} == result["timing"]
    ok = {(r["backend"], r["precision"]): r["median_ms"] for r in result["suite"]["rows"]
          if r["status"] == "ok" and r["batch"] == 1}
    by_row = {(r["method"], r["backend"]): r for r in result["table"] if r["precision"] == "FP32"}
    assert by_row[("float (fused)", "PyTorch eager")]["cpu_latency_ms"] == ok[("eager", "fp32")]
    assert by_row[("float (fused)", "ONNX Runtime CPU")]["cpu_latency_ms"] == ok[("ort-cpu", "fp32")]
    assert main(["demo", "--fast", "--out", str(out), "--quiet"]) == 2  # refuses to overwrite


def test_export_failure_exits_non_zero_and_writes_nothing(grown, tmp_path, capsys, monkeypatch) -> None:
    import adagrow.compress.export as export

    real = export.export_onnx
    monkeypatch.setattr(export, "export_onnx", _raising(ValueError("ONNX Runtime cosine 0.70 is below 0.9999")))
    argv = ["export", str(grown), "--precision", "fp32", "--out", str(tmp_path / "m.onnx"), "--triton-repo",
            str(tmp_path / "repo"), *SMALL]
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and "cosine 0.70 is below" in err
    monkeypatch.setattr(export, "export_onnx", real)  # a later step fails: the ONNX file is not placed either
    monkeypatch.setattr(export, "export_triton_repository", _raising(OSError("disk full")))
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and "disk full" in err
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_follow_the_umask_and_keep_the_old_file(tmp_path) -> None:
    from adagrow.files import atomic_directory, atomic_write, write_text
    old = os.umask(0o027)
    try:
        path = write_text(tmp_path / "a.txt", "old")
        folder = atomic_directory(tmp_path / "repo" / "m", lambda d: (d / "1").mkdir() or (d / "f").write_text("x"))
        assert path.stat().st_mode & 0o777 == 0o640 and (folder / "f").stat().st_mode & 0o777 == 0o640
        assert folder.stat().st_mode & 0o777 == 0o750 and (folder / "1").stat().st_mode & 0o777 == 0o750
        with pytest.raises(RuntimeError, match="interrupted"):
            atomic_write(path, lambda tmp: Path(tmp).write_text("half") and _raising(RuntimeError("interrupted"))())
        with pytest.raises(FileExistsError, match="overwrite=True"):
            atomic_directory(folder, lambda d: None)
    finally:
        os.umask(old)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "repo"]
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["m"]


def test_bench_suite_schema_and_tensorrt_runner_plumbing(monkeypatch) -> None:
    """Every [suite] default has a schema entry; the TensorRT backend returns a runner, not a skip."""
    import adagrow.bench as bench
    assert set(bench._suite_schema()["properties"]["suite"]["properties"]) == set(bench.SUITE_DEFAULTS)

    class Prep:
        def engine(self, precision):
            return Path(f"model_{precision}.plan")

    monkeypatch.setattr(bench, "_tensorrt_runner", lambda plan: ("runner", plan))
    assert bench._runner(Prep(), "tensorrt", "int8", 1) == (("runner", Path("model_int8.plan")), "cuda", None)
