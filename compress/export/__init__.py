"""Export: ONNX fp32 / fp16 / INT8-QDQ / W4, TensorRT engines, Triton Inference Server repositories."""
from .onnx_export import ExportReport, export_onnx, fused_node_counts, ort_session

__all__ = ["export_onnx", "ExportReport", "fused_node_counts", "ort_session"]
