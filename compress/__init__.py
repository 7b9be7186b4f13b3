"""Compression: uniform grids, round-to-nearest, the OBS quantizer and quantized modules."""
from .io import load_quantized, save_quantized
from .model import QuantConfig, quantize
from .obs import OBSQuantizer, QuantResult, rtn_quantize
from .qmodules import QuantConv2d, QuantLinear

__all__ = ["OBSQuantizer", "QuantResult", "rtn_quantize", "QuantConfig", "quantize",
           "QuantLinear", "QuantConv2d", "save_quantized", "load_quantized"]
