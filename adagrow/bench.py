"""Latency suites: models x backends x precisions x batch sizes, described in a TOML file.

```toml
[suite]
warmup = 10          # untimed calls per case
runs = 50            # timed calls per case
threads = 2          # CPU threads (PyTorch and ONNX Runtime)
batch_sizes = [1, 32]
seq_lens = [128]     # sequence lengths for token-input (Transformer) ONNX models
data = "digits"      # calibration data for int8 / w4a16 (and the input shape)
size = 16

[[model]]
name = "digits-cnn"
path = "demo_out/grown.safetensors"    # grown checkpoint, quantized checkpoint or .onnx
backends = ["eager", "compile", "ort-cpu", "ort-cuda", "tensorrt", "triton"]
precisions = ["fp32", "fp16", "int8", "w4a16"]
```

Backend/precision pairs this machine cannot run are reported as skipped with the reason.
"""
from __future__ import annotations

import importlib.util
import json
import platform
import resource
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from adagrow import __version__
from adagrow.compress.cpu_path import INT4_MAX_ROWS
from adagrow.timing import measure
from adagrow.data import MAX_IMAGE_SIZE

BACKENDS = ("eager", "compile", "ort-cpu", "ort-cuda", "tensorrt", "triton")
PRECISIONS = ("fp32", "fp16", "int8", "w4a16")
MAX_BATCH_BYTES = 4 << 30  # one input batch of a suite
SUITE_DEFAULTS = {"warmup": 10, "runs": 50, "threads": 2, "batch_sizes": [1, 32], "seq_lens": [128], "data": "digits",
                  "size": 16}

CPU_REFERENCE_NOTE = ("On CPU, PyTorch's quantized layers keep their dequantized weight after the first call (4-bit "
                      "on disk, float in memory; float32 numerics; convs with kernels over 3x3 or groups, and large "
                      "calls of 4-bit Linears, on oneDNN's prepacked weight); 4-bit Linears run PyTorch's int4 "
                      f"weight-only kernel on bfloat16 inputs and on float32 calls of at most {INT4_MAX_ROWS} rows, "
                      "rounded to bfloat16 (adagrow.compress.use_bf16_activations(model, False) keeps float32). "
                      "Latencies: median of the timed calls after warm-up, the same method for the table and the "
                      "suite (adagrow.timing.measure).")


def _suite_schema() -> dict[str, Any]:
    from adagrow.schema import int_list, integer, record
    name = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"}  # also a file-name stem
    model = record({"name": name, "path": {"type": "string", "minLength": 1},
                    "backends": {"type": "array", "items": {"enum": list(BACKENDS)}, "minItems": 1,
                                 "uniqueItems": True},
                    "precisions": {"type": "array", "items": {"enum": list(PRECISIONS)}, "minItems": 1,
                                   "uniqueItems": True}}, optional=("backends", "precisions"))
    suite = record({"warmup": integer(0, 100_000), "runs": integer(1, 1_000_000), "threads": integer(1, 1024),
                    "batch_sizes": {**int_list(1, 65536, 1, 64), "uniqueItems": True},
                    "seq_lens": {**int_list(1, 1 << 20, 1, 64), "uniqueItems": True},
                    "data": {"type": "string"}, "size": integer(1, MAX_IMAGE_SIZE)}, optional=SUITE_DEFAULTS)
    return record({"suite": suite, "model": {"type": "array", "items": model, "minItems": 1}}, optional=("suite",))


def load_suite(path: str | Path) -> dict[str, Any]:
    """Read and validate a suite file; errors name the file and the field (unknown or misspelled
    keys, runs < 1, batch sizes < 1, unknown backends / precisions, duplicate model names)."""
    from adagrow.schema import check
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"suite file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    if not raw.get("model"):
        raise ValueError(f"{path}: no [[model]] entries")
    check(raw, _suite_schema(), str(path), "")
    suite = {**SUITE_DEFAULTS, **raw.get("suite", {})}
    models = raw["model"]
    names = [m["name"] for m in models]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: field model: duplicate model names {dup}")
    for m in models:
        m["path"] = str((path.parent / m["path"]) if not Path(m["path"]).is_absolute() else m["path"])
        m.setdefault("backends", ["eager", "ort-cpu"])
        m.setdefault("precisions", ["fp32"])
    suite["models"] = models
    biggest = max(suite["batch_sizes"]) * 3 * suite["size"] ** 2 * 4  # float32 images, up to 3 channels
    if biggest > MAX_BATCH_BYTES:
        raise ValueError(f"{path}: field suite.batch_sizes: a batch of {max(suite['batch_sizes'])} images of "
                         f"{suite['size']}x{suite['size']} needs {biggest / 2**30:.1f} GiB, more than "
                         f"{MAX_BATCH_BYTES / 2**30:.0f} GiB")
    return suite


def unavailable(backend: str, precision: str, source: str) -> str | None:
    """Why this machine cannot run a case, or None."""
    cuda = torch.cuda.is_available()
    if source == "onnx" and backend not in ("ort-cpu", "ort-cuda", "tensorrt"):
        return "an ONNX model runs on ONNX Runtime or TensorRT only"
    if source == "quantized" and precision != "w4a16":
        return "a quantized checkpoint is measured at its own precision (w4a16)"
    if backend in ("eager", "compile"):
        if precision == "int8":
            return "PyTorch has no INT8 kernels for these layers; use ort-cpu or tensorrt"
        if precision == "fp16" and not cuda:
            return "fp16 in PyTorch needs a CUDA GPU here (no fast fp16 CPU convolutions)"
        if backend == "compile" and not cuda and shutil.which("cc") is None and shutil.which("gcc") is None:
            return "torch.compile on CPU needs a C compiler (cc/gcc not found)"
    if backend == "ort-cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a CUDA machine)"
    if backend == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt is not installed"
        if not cuda:
            return "TensorRT needs an NVIDIA GPU"
        if precision == "w4a16":
            return "the w4 ONNX graph uses ONNX Runtime's weight-only operators; TensorRT runs fp32, fp16 and int8 here"
    if backend == "triton":
        if not cuda:
            return "adagrow's Triton kernels need a CUDA GPU (on CPU only the interpreter runs them, for tests)"
        if precision not in ("fp16", "w4a16"):
            return "the Triton kernels run fp16 (fused convs) and w4a16"
    return None


def model_source(path: str) -> str:
    """What a model file holds: ``"onnx"``, ``"quantized"`` (an adagrow quantized checkpoint) or
    ``"grown"`` (a grown checkpoint), from its suffix and safetensors metadata."""
    if path.endswith(".onnx"):
        return "onnx"
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("adagrow", "{}"))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable checkpoint: {exc}") from exc
    if meta.get("format") == "adagrow-quantized":
        return "quantized"
    if meta.get("format") == "adagrow-grown":
        return "grown"
    raise ValueError(f"{path}: neither an adagrow grown/quantized checkpoint nor an .onnx file")


class _Prepared:
    """Per model: float deploy model, quantized model and exported ONNX files, built on demand."""

    def __init__(self, spec: dict, suite: dict, workdir: Path):
        from adagrow.data import load_dataset
        self.spec, self.suite, self.workdir = spec, suite, workdir
        self.source = model_source(spec["path"])
        x_tr, _, x_te, _ = load_dataset(suite["data"], suite["size"])
        self.calib = list(x_tr[:256].split(64))
        self.example = x_te
        self.cache: dict[str, Any] = {}

    def _fitting(self, model: nn.Module) -> nn.Module:
        from adagrow.checks import input_shape_mismatch
        shape = input_shape_mismatch(model, self.example)
        if shape is not None:  # ValueError, not RuntimeError: a wrong suite is an error, not a skip
            raise ValueError(f"{self.spec['path']} was grown on inputs {shape}, but the suite's data / size give "
                             f"{list(self.example.shape[1:])}; set size = {shape[-1]} in [suite]")
        return model

    def float_model(self) -> nn.Module:
        if "float" not in self.cache:
            from adagrow.grow import load_deploy
            self.cache["float"] = self._fitting(load_deploy(self.spec["path"]))
        return self.cache["float"]

    def quant_model(self) -> nn.Module:
        if "w4" not in self.cache:
            from adagrow.compress import QuantConfig, load_quantized, quantize
            self.cache["w4"] = (self._fitting(load_quantized(self.spec["path"])) if self.source == "quantized"
                                else quantize(self.float_model(), self.calib, QuantConfig(bits=4), progress=False))
        return self.cache["w4"]

    def onnx(self, precision: str, target: str = "onnxruntime") -> Path:
        if self.source == "onnx":
            return Path(self.spec["path"])
        key = f"onnx-{precision}-{target}"
        if key not in self.cache:
            from adagrow.compress.export import export_onnx
            prec = {"w4a16": "w4"}.get(precision, precision)
            model = self.quant_model() if prec == "w4" else self.float_model()
            path = self.workdir / f"{self.spec['name']}_{prec}_{target}.onnx"
            export_onnx(model, self.example[:8], path, prec, calib=self.calib, target=target, overwrite=True,
                        progress=False)
            self.cache[key] = path
        return self.cache[key]

    def engine(self, precision: str) -> Path:
        """A TensorRT engine of the ONNX export (Q/DQ in TensorRT's flavour for int8)."""
        key = f"engine-{precision}"
        if key not in self.cache:
            from adagrow.compress.export import build_engine
            onnx_path = self.onnx(precision, target="tensorrt")
            path = self.workdir / f"{onnx_path.stem}.plan"
            batches = self.suite["batch_sizes"]
            self.cache[key] = build_engine(onnx_path, path, min_batch=min(batches), opt_batch=max(batches),
                                           max_batch=max(batches), overwrite=True)
        return self.cache[key]


def _tensorrt_runner(plan: Path):
    """A callable running a serialized engine on CUDA tensors (TensorRT 10 tensor API)."""
    import tensorrt as trt
    dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
              trt.DataType.INT64: torch.int64, trt.DataType.BF16: torch.bfloat16, trt.DataType.BOOL: torch.bool}
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {plan}")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 1:
        raise RuntimeError(f"{plan}: the bench feeds one input, the engine has {inputs}")

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        x = x.to("cuda", dtypes[engine.get_tensor_dtype(inputs[0])]).contiguous()
        context.set_input_shape(inputs[0], tuple(x.shape))
        context.set_tensor_address(inputs[0], x.data_ptr())
        outs = []
        for name in outputs:
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtypes[engine.get_tensor_dtype(name)],
                              device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT execution of {plan} failed")
        return outs

    return run


def _token_inputs(sess: ort.InferenceSession) -> bool:
    """Every input is an integer ``[batch, sequence]`` tensor (input_ids / attention_mask / ...)."""
    return all(i.type in ("tensor(int64)", "tensor(int32)") and len(i.shape) == 2 for i in sess.get_inputs())


def token_feed(sess: ort.InferenceSession, batch: int, seq: int, vocab: int = 100) -> dict[str, np.ndarray]:
    """Token ids in ``[1, vocab)`` (valid for any real vocabulary), all-ones attention masks, zero token
    types, at ``[batch, seq]``."""
    feed = {}
    for i in sess.get_inputs():
        dt = np.int64 if i.type == "tensor(int64)" else np.int32
        if "mask" in i.name:
            feed[i.name] = np.ones((batch, seq), dt)
        elif "type" in i.name:
            feed[i.name] = np.zeros((batch, seq), dt)
        else:
            feed[i.name] = np.random.default_rng(0).integers(1, vocab, (batch, seq)).astype(dt)
    return feed


def _runner(prep: _Prepared, backend: str, precision: str, threads: int):
    """(callable taking a batch, device name, the ORT session when it takes token feeds else None)."""
    cuda = backend in ("ort-cuda", "tensorrt", "triton") or (backend in ("eager", "compile") and
                                                               precision == "fp16")
    if backend in ("ort-cpu", "ort-cuda"):
        from adagrow.compress.export import ort_session
        path = prep.onnx(precision)
        if backend == "ort-cpu":
            sess = ort_session(path, threads=threads)
        else:
            sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        half = sess.get_inputs()[0].type == "tensor(float16)"
        dev = "cuda" if backend == "ort-cuda" else "cpu"
        if _token_inputs(sess):  # Transformer: x is a {name: [batch, seq]} feed
            return (lambda x: sess.run(None, x)), dev, sess
        return (lambda x: sess.run(None, {name: (x.numpy().astype(np.float16) if half else x.numpy())})), dev, None
    if backend == "tensorrt":
        return _tensorrt_runner(prep.engine(precision)), "cuda", None
    model = prep.quant_model() if precision == "w4a16" else prep.float_model()
    device = "cuda" if (cuda or backend == "triton" or (precision == "w4a16" and torch.cuda.is_available())) else "cpu"
    model = model.to(device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = model.to(dtype) if precision != "w4a16" else model
    if backend == "compile":
        model = torch.compile(model)
    if backend == "triton":  # fused NHWC conv kernels (float or W4 weights); residuals checked on an example
        from adagrow.kernels import to_kernels
        try:
            model = to_kernels(model, prep.example[:1].to(device, dtype))
        except ValueError as exc:  # a model fx cannot trace: reported as skipped with the reason
            raise RuntimeError(str(exc)) from exc

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device, dtype))

    return run, device, None


def run_suite(suite: dict, progress: bool = True) -> dict[str, Any]:
    """Time every case; returns a JSON-ready dict with one row per (model, backend, precision, batch)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in suite["models"]:
            prep = _Prepared(spec, suite, Path(tmp))
            for backend in spec["backends"]:
                for precision in spec["precisions"]:
                    reason = unavailable(backend, precision, prep.source)
                    runner = device = tokens = None
                    if reason is None:
                        try:
                            runner, device, tokens = _runner(prep, backend, precision, suite["threads"])
                        except RuntimeError as exc:
                            reason = str(exc)
                    seqs = suite["seq_lens"] if tokens is not None else [None]  # sequence axis: token models
                    for batch, seq in [(b, q) for b in suite["batch_sizes"] for q in seqs]:
                        row = {"model": spec["name"], "backend": backend, "precision": precision, "batch": batch}
                        if seq is not None:
                            row["seq"] = seq
                        if reason is not None:
                            rows.append({**row, "status": "skipped", "reason": reason})
                            continue
                        if seq is not None:
                            x = token_feed(tokens, batch, seq)
                        else:
                            x = prep.example[:batch]
                            if len(x) < batch:
                                x = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch]
                        if device == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        timed = measure(lambda: runner(x), suite["warmup"], suite["runs"], suite["threads"], device)
                        med = timed["median_ms"]
                        peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
                        rows.append({**row, "status": "ok", "device": device, "median_ms": med,
                                     "p90_ms": timed["p90_ms"], "throughput_per_s": batch / med * 1e3,
                                     "peak_mem_mb": peak, "peak_mem_kind": "cuda allocated" if device == "cuda"
                                     else "process peak RSS"})
                        if progress:
                            print(f"  {spec['name']} {backend:<8} {precision:<6} b{batch:<3}"
                                  f"{'' if seq is None else f' L{seq}'} {med:8.3f} ms", flush=True)
    return {"adagrow": __version__, "torch": torch.__version__, "onnxruntime": ort.__version__,
            "platform": platform.platform(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "threads": suite["threads"], "warmup": suite["warmup"], "runs": suite["runs"], "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| model | backend | precision | batch | median ms | p90 ms | throughput/s | peak MB | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["status"] == "ok":
            lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['batch']} | {r['median_ms']:.3f} | "
                         f"{r['p90_ms']:.3f} | {r['throughput_per_s']:.0f} | {r['peak_mem_mb']:.0f} | {r['device']} |")
        else:
            lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['batch']} | - | - | - | - | "
                         f"skipped: {r['reason']} |")
    return "\n".join(lines) + "\n"


_OK_ROW = {"required": ["model", "backend", "precision", "batch", "median_ms"],
           "properties": {"model": {"type": "string"}, "backend": {"type": "string"},
                          "precision": {"type": "string"}, "batch": {"type": "integer"},
                          "median_ms": {"type": "number", "exclusiveMinimum": 0}}}
_RESULTS = {"type": "object", "required": ["rows"],
            "properties": {"rows": {"type": "array", "items": {
                "type": "object", "required": ["status"], "properties": {"status": {"type": "string"}},
                "if": {"properties": {"status": {"const": "ok"}}}, "then": _OK_ROW}}}}


def check_results(old: Any, where: str) -> dict:
    """An earlier results JSON (``--compare``) checked before a run: ``ValueError`` naming the
    file and the field of the first row :func:`compare` could not read."""
    from adagrow.schema import check
    check(old, _RESULTS, where, "results")
    return old


def compare(result: dict, old: dict) -> list[str]:
    """Lines with new/old median ratios for the cases both runs measured."""
    key = lambda r: (r["model"], r["backend"], r["precision"], r["batch"])  # noqa: E731
    before = {key(r): r for r in old.get("rows", []) if r.get("status") == "ok"}
    out = []
    for r in result["rows"]:
        o = before.get(key(r))
        if r["status"] == "ok" and o:
            out.append(f"{r['model']} {r['backend']} {r['precision']} b{r['batch']}: {o['median_ms']:.3f} -> "
                       f"{r['median_ms']:.3f} ms (x{r['median_ms'] / o['median_ms']:.2f})")
    return out
