"""Compression: uniform grids, round-to-nearest, the OBS quantizer, quantized modules, our
checkpoints and server checkpoints (compressed-tensors, GPTQ)."""
if __name__ != "adagrow.compress":  # the folder is on sys.path as a top-level name (run from a checkout)
    raise ImportError("this folder is the package adagrow.compress: import it as adagrow.compress "
                      "(importing it as 'compress' would load second copies of its modules)")
from .io import load_quantized, save_quantized
from .model import QuantConfig, quantize
from .obs import OBSQuantizer, QuantResult, rtn_quantize
from .qmodules import QuantConv2d, QuantLinear
from .server_formats import save_compressed

__all__ = ["OBSQuantizer", "QuantResult", "rtn_quantize", "QuantConfig", "quantize",
           "QuantLinear", "QuantConv2d", "save_quantized", "load_quantized", "save_compressed"]
