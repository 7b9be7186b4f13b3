"""Compression: uniform grids, round-to-nearest, the OBS quantizer, quantized modules, our
checkpoints and server checkpoints (compressed-tensors, GPTQ)."""
from .io import load_quantized, save_quantized
from .model import QuantConfig, quantize
from .obs import OBSQuantizer, QuantResult, rtn_quantize
from .qmodules import QuantConv2d, QuantLinear
from .server_formats import save_compressed

__all__ = ["OBSQuantizer", "QuantResult", "rtn_quantize", "QuantConfig", "quantize",
           "QuantLinear", "QuantConv2d", "save_quantized", "load_quantized", "save_compressed"]
