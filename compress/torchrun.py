"""Quantize a checkpoint folder with data-parallel calibration, as a ``torchrun`` entry point.

.. code-block:: bash

    python -m torch.distributed.run --nproc_per_node 2 -m adagrow.compress.torchrun SRC CALIB DST

``CALIB`` is a safetensors file of calibration batches: tensors named ``<argument>.<batch>``
(``input_ids.0``, ``attention_mask.0``, ``input_ids.1``, ...), each batch passed to the model
as keyword arguments. Every rank reads the checkpoint block by block
(:func:`~adagrow.compress.onload.quantize_pretrained`) and calibrates on batches
``rank, rank + world, ...``; Hessians are all-reduced before each group of layers is quantized,
each layer is then solved by one rank and broadcast (:mod:`.ranks`, docs/scale.md). Every rank
ends with the whole quantized model: they are compared (a SHA-256 of each tensor) and a
disagreement is an error. Rank 0 writes ``DST/model.adagrow.safetensors`` and ``DST/run.json``
(per rank: wall and CPU seconds of the quantization, after the imports, the number of layers it
solved, the digest of its model).
Without ``torchrun`` (no ``RANK`` in the environment) it runs as one process on all the batches.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import time
from pathlib import Path

import torch

from adagrow.files import write_json

from .model import HESSIAN_DTYPES, QuantConfig
from .onload import OUT_NAME, empty_model, quantize_pretrained

_KEY = re.compile(r"^(?P<arg>[A-Za-z_][A-Za-z0-9_]*)\.(?P<batch>\d+)$")


def read_batches(path: str | os.PathLike) -> list[dict[str, torch.Tensor]]:
    """Calibration batches from a safetensors file of ``<argument>.<batch>`` tensors."""
    from safetensors.torch import load_file
    batches: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{path}: tensor {key!r} is not named <argument>.<batch> (e.g. input_ids.0)")
        batches.setdefault(int(m["batch"]), {})[m["arg"]] = tensor
    if sorted(batches) != list(range(len(batches))):
        raise ValueError(f"{path}: batches must be numbered 0..{len(batches) - 1}, got {sorted(batches)}")
    return [batches[i] for i in range(len(batches))]


def write_batches(path: str | os.PathLike, batches: list[dict[str, torch.Tensor]]) -> None:
    """The inverse of :func:`read_batches`."""
    from safetensors.torch import save_file
    save_file({f"{k}.{i}": v.contiguous() for i, b in enumerate(batches) for k, v in b.items()}, str(path))


def tensor_digests(model: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of every tensor of ``model``'s state dict (its bytes, on CPU), by name."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
            for k, v in model.state_dict().items()}


def _disagreeing(every: list[dict[str, str]]) -> list[str]:
    """Tensor names whose digest is not the same on every rank (or missing on some)."""
    names = sorted(set().union(*every))
    return [k for k in names if len({d.get(k) for d in every}) != 1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="Hugging Face checkpoint folder (config.json, model.safetensors)")
    ap.add_argument("calib", help="safetensors file of calibration batches (<argument>.<batch> tensors)")
    ap.add_argument("dst", help="output folder (rank 0 writes model.adagrow.safetensors and run.json)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--hessian-dtype", choices=tuple(HESSIAN_DTYPES), default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch.distributed as dist
    distributed = "RANK" in os.environ
    if distributed:
        # gloo: quantize_pretrained calibrates and solves on CPU, so every collective is on CPU
        # tensors (NCCL takes CUDA tensors only)
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        batches = read_batches(args.calib)
        if len(batches) < world:
            raise ValueError(f"{args.calib}: {len(batches)} batches for {world} ranks; every rank needs one")
        config = QuantConfig(bits=args.bits, group_size=args.group_size, hessian_dtype=args.hessian_dtype)
        empty_model(args.src)  # imports the model's code (seconds of CPU) before the timed run
        if distributed:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        qmodel = quantize_pretrained(args.src, batches[rank::world], config, progress=False)
        times: dict[str, float | str] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                                         "solved": len(getattr(qmodel, "adagrow_quant")["solved_here"])}
        digests = tensor_digests(qmodel)
        every, every_digests = [times], [digests]
        if distributed:
            every, every_digests = [{} for _ in range(world)], [{} for _ in range(world)]
            dist.all_gather_object(every, times)
            dist.all_gather_object(every_digests, digests)
        bad = _disagreeing(every_digests)
        if bad:
            raise RuntimeError(f"ranks ended with different quantized tensors: {bad[:5]} ({len(bad)} in all)")
        for r, d in zip(every, every_digests):
            r["digest"] = hashlib.sha256("".join(f"{k}={d[k]};" for k in sorted(d)).encode()).hexdigest()
        report = {"ranks": world, "batches": len(batches), "config": vars(args), "per_rank": every}
        if rank == 0:
            from .io import save_quantized
            dst = Path(args.dst)
            dst.mkdir(parents=True, exist_ok=True)
            save_quantized(qmodel, dst / OUT_NAME, overwrite=True)
            write_json(dst / "run.json", report)
        return report
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
