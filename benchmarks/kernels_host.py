"""Host time per W4A16 call with the kernel launch stubbed (CPU, no GPU needed).

Measures what a call costs on the host before the driver sees a launch: argument checks, the
memoised config lookup and :class:`~adagrow.kernels.w4a16.LaunchPlan`, the per-call split-K
workspace (two allocator calls), the output allocation, and (for the ops) PyTorch's custom-op
dispatch. ``op_sz`` is what a ``QuantLinear`` calls (prepacked (s, z) pairs); ``op`` also
repacks scales and zeros into pairs on every call. The Triton launch itself is replaced by a no-op, so Triton's own launcher cost
(argument specialisation, ~10-20 µs in Triton 3.x Python launchers) is NOT included. CPU tensors
stand in for CUDA ones (the CPU allocator, not the CUDA caching allocator). Timings on a shared
CPU are noisy, so the clock is the process's CPU time (``time.process_time``: time slices
given to other processes are not counted), the entry points and a yardstick (one
``torch.empty`` of the output's size) are measured interleaved, median of rounds; compare calls
in units of the yardstick.

Usage: ``python benchmarks/kernels_host.py [--calls 2000] [--out FILE]``
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from adagrow.files import write_json
from adagrow.kernels import w4a16 as w4
from adagrow.packed import pack_scale_zero

SHAPES = [(1, 8192, 8192), (16, 8192, 8192), (128, 8192, 8192)]  # (M, N, K), group 128


class _NoLaunch:
    """Stands in for ``kernel[grid]``: records that a launch would have happened."""
    launches = 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            _NoLaunch.launches += 1
        return launch


def host_us(calls: int, rounds: int = 5) -> list[dict]:
    """Median host µs per call of ``w4a16_triton_sz`` and of the custom ops, per shape."""
    rows = []
    with mock.patch.object(w4, "_kernel_for", lambda path: _NoLaunch()), \
            mock.patch.object(w4, "use_triton", lambda x: True):
        for m, n, k in SHAPES:
            qw = torch.zeros(k // 8, n, dtype=torch.int32)
            s = torch.ones(k // 128, n, dtype=torch.float16)
            sz = pack_scale_zero(s, s)
            x = torch.zeros(m, k, dtype=torch.float16)
            fns = {"w4a16_triton_sz": lambda: w4.w4a16_triton_sz(x, qw, sz, 128),
                   "op_sz": lambda: torch.ops.adagrow.w4a16_matmul_sz(x, qw, sz, 128),
                   "op": lambda: torch.ops.adagrow.w4a16_matmul(x, qw, s, s, 128),
                   "torch_empty": lambda: torch.empty(m, n, dtype=torch.float16)}  # yardstick of this host
            samples: dict[str, list[float]] = {name: [] for name in fns}
            for fn in fns.values():
                fn()  # memoise the lookup and plan
            for _ in range(rounds):
                for name, fn in fns.items():  # interleaved
                    t0 = time.process_time()
                    for _ in range(calls):
                        fn()
                    samples[name].append((time.process_time() - t0) / calls * 1e6)
            plan = w4.plan_for(w4.path_for(m), w4.lookup_config(m, n, k, 128, x.dtype, x.device), m, n, k, 128)
            rows.append({"M": m, "N": n, "K": k, "path": plan.path, "config": list(plan.config),
                         "split_k_workspace": plan.ws_floats > 0,
                         **{f"{name}_host_us": statistics.median(v) for name, v in samples.items()}})
            print(f"M={m:>3} {plan.path:>6}: w4a16_triton_sz {rows[-1]['w4a16_triton_sz_host_us']:.1f} us, "
                  f"op_sz {rows[-1]['op_sz_host_us']:.1f} us, op (repacking) {rows[-1]['op_host_us']:.1f} us "
                  f"per call (launch stubbed); one torch.empty "
                  f"{rows[-1]['torch_empty_host_us']:.1f} us on this host")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = host_us(args.calls)
    if args.out:
        write_json(args.out, {"benchmark": "kernels_host", "note": __doc__.split("\n\n")[1].replace("\n", " "),
                              "command": "python benchmarks/kernels_host.py " + " ".join(argv or []),
                              "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
