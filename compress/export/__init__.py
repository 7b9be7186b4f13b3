"""Export: ONNX fp32 / fp16 / INT8-QDQ / W4, TensorRT engines, Triton Inference Server repositories."""
from .onnx_export import ExportReport, export_onnx, fused_node_counts
from .tensorrt import build_engine, profile_shapes
from .triton_repo import export_triton_repository
from .verify import THRESHOLDS, ExportCheckError, ort_session

__all__ = ["export_onnx", "ExportReport", "ExportCheckError", "THRESHOLDS", "fused_node_counts", "ort_session",
           "build_engine", "profile_shapes", "export_triton_repository"]
