"""Test session setup (before any adagrow import).

- Triton kernels run in the CPU interpreter when there is no GPU.
- Subprocesses the tests start import the checkout under test (this repository), not whatever
  adagrow another install put on sys.path.
"""
import os
from pathlib import Path

import torch

ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
