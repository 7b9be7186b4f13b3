"""Run the Triton kernels in the CPU interpreter when there is no GPU (set before any import)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
