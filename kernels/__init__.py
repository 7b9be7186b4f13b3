"""Triton kernels for the deploy form (W4A16 matmul, fused convs). Not implemented yet."""
