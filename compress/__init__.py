"""Compression: uniform grids, round-to-nearest, the OBS quantizer and quantized modules."""
