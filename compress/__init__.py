"""Compression: uniform grids, round-to-nearest, the OBS quantizer, quantized modules, our
checkpoints and server checkpoints (compressed-tensors, GPTQ)."""
if __name__ != "adagrow.compress":  # found as a top-level name from a checkout: see adagrow.checkout
    from adagrow.checkout import become_stand_in
    become_stand_in(globals())
else:
    from .hf_kernels import use_kernels
    from .io import load_quantized, save_quantized
    from .model import QuantConfig, quantize
    from .obs import OBSQuantizer, QuantResult, rtn_quantize
    from .qmodules import QuantConv2d, QuantLinear, use_bf16_activations
    from .server_formats import save_compressed

    __all__ = ["OBSQuantizer", "QuantResult", "rtn_quantize", "QuantConfig", "quantize",
               "QuantLinear", "QuantConv2d", "save_quantized", "load_quantized", "save_compressed", "use_kernels",
               "use_bf16_activations"]
