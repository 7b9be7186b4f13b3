"""Optional Triton import and the facts the kernels dispatch on."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # non-Linux installs: the PyTorch references serve every op
    triton = tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def smem_limit(device: torch.device | None) -> int:
    """Shared memory per block in bytes (opt-in maximum on CUDA; 100 KiB elsewhere)."""
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)
    return 100 * 1024
