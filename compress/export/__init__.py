"""Export: ONNX fp32 / fp16 / INT8-QDQ / W4, decoder LMs with a KV cache (and greedy generation in ONNX
Runtime), TensorRT engines, Triton Inference Server repositories."""
from .decoder import export_decoder_onnx
from .generate import Generation, greedy_generate, torch_greedy_generate
from .onnx_export import ExportReport, export_onnx, fused_node_counts
from .tensorrt import build_engine, profile_shapes
from .triton_repo import export_triton_repository
from .verify import THRESHOLDS, ExportCheckError, ort_session

__all__ = ["export_onnx", "export_decoder_onnx", "greedy_generate", "torch_greedy_generate", "Generation", "ExportReport",
           "ExportCheckError", "THRESHOLDS", "fused_node_counts", "ort_session", "build_engine", "profile_shapes",
           "export_triton_repository"]
