"""Static verification of the Triton kernels for sm_90 / sm_80 without a GPU.

Compiles every kernel at every config of its table, at the benchmark shapes, with Triton's
compiler for the target arch (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``),
disassembles it with the ``cuobjdump`` shipped in the triton wheel and writes one JSON record per
(kernel, config, shape, arch): registers, spill bytes, shared memory vs the arch's limit,
tensor-core ops, I2F in the main loop, global load bytes per main-loop iteration (SASS load
widths x threads) vs the tile's unique bytes, and the SASS file name.

Per shape it also writes a static time ESTIMATE (``adagrow.kernels.static.estimate_us``: the
latency-aware model of docs/kernels.md, calibrated on GemLite's published H100 figures by
``benchmarks/gemlite_static.py``) for the config the shipped table picks and for the best config,
against the fp16 matmul under the same constants (``static.fp16_matmul_us``). Estimates, not
measurements.

Usage: ``python benchmarks/kernels_static.py --arch 90 --out benchmarks/results/kernels_static_sm90.json
--sass-dir DIR [--paths gemv splitk] [--max-configs N] [--table kernels/tables/w4a16.json]``
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import platform
import sys
from pathlib import Path

from tqdm import tqdm

from adagrow.files import write_json
from adagrow.kernels import static

MODULES = ["adagrow.kernels.w4a16", "adagrow.kernels.conv"]


def collect_specs(arch: int, paths: list[str] | None, max_configs: int | None) -> list[static.StaticSpec]:
    """Every module's ``static_specs(arch)`` (modules without it are skipped with a note),
    filtered by path and limited to the first ``max_configs`` configs per (path, shape)."""
    specs = []
    for name in MODULES:
        mod = importlib.import_module(name)
        if not hasattr(mod, "static_specs"):
            print(f"note: {name} has no static_specs(arch) yet; its kernels are not inspected", file=sys.stderr)
            continue
        seen: dict[tuple, int] = {}
        for spec in mod.static_specs(arch):
            if paths and spec.path not in paths:
                continue
            key = (spec.kernel, tuple(spec.shape.items()))
            seen[key] = seen.get(key, 0) + 1
            if max_configs is None or seen[key] <= max_configs:
                specs.append(spec)
    return specs


def fp16_us(shape: dict[str, int], arch: int) -> float | None:
    """fp16 matmul's time under the same model constants (``static.fp16_matmul_us``)."""
    if not {"M", "N", "K"} <= set(shape):
        return None
    return static.fp16_matmul_us(shape["M"], shape["N"], shape["K"], arch)


def shape_estimates(records: list[dict], arch: int) -> list[dict]:
    """Per (kernel path, shape): the table default's and the best config's static estimate vs fp16."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["path"], tuple(r["shape"].items())), []).append(r)
    for (path, shape), recs in groups.items():
        ok = [r for r in recs if r["fits"] and r["spill_bytes"] == 0]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["estimate_us"])
        default = next((r for r in ok if r.get("table_default")), ok[0])
        fp16 = fp16_us(dict(shape), arch)
        row = {"label": "static estimate (not a measurement)", "path": path, "shape": dict(shape),
               "fp16_us": fp16}
        for tag, r in (("default", default), ("best", best)):
            row[tag] = {"config": r["config"], "estimate_us": r["estimate_us"],
                        "estimate_mem_us": r["estimate_mem_us"], "estimate_sm_us": r["estimate_sm_us"],
                        "estimate_bound": r["estimate_bound"],
                        "speedup_vs_fp16_estimate": fp16 / r["estimate_us"] if fp16 else None}
        out.append(row)
    return out


def run(arch: int, sass_dir: Path | None, paths: list[str] | None = None,
        max_configs: int | None = None) -> dict:
    """Inspect every spec for ``arch``; returns the result document (records + estimates)."""
    reason = static.unavailable_reason()
    if reason:
        raise RuntimeError(f"static inspection unavailable: {reason}")
    import triton
    specs = collect_specs(arch, paths, max_configs)
    records = [static.inspect_spec(s, arch, sass_dir) for s in tqdm(specs, desc=f"sm_{arch}", unit="kernel")]
    return {"benchmark": "kernels_static", "arch": arch, "reference_gpu": static.ARCH[arch]["gpu"],
            "machine": platform.node() + " (" + platform.processor() + ", no GPU needed)",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "triton": triton.__version__, "records": records, "estimates": shape_estimates(records, arch)}


def update_table(table: Path, doc: dict) -> None:
    """Write the best-estimate config per matmul shape into the package's per-GPU table
    (``kernels/tables/w4a16.json``) under the arch's reference GPU, marked as static estimates."""
    data = json.loads(table.read_text())
    key = static.ARCH[doc["arch"]]["table_key"]
    rows = data["gpus"].setdefault(key, {})
    for e in doc["estimates"]:
        shape = e["shape"]
        if e["path"] in ("gemv", "splitk", "gemm"):
            m = shape["M"]
            bucket = 1 if m == 1 else min(1 << (m - 1).bit_length(), 256)
            rows[f"{shape['N']},{shape['K']},{bucket}"] = list(e["best"]["config"].values())
    data["sources"][key] = f"static estimate, {doc['command']}, {doc['date']} (not measured on a GPU)"
    write_json(table, data)
    mark_table_rows(doc, rows)


def mark_table_rows(doc: dict, rows: dict[str, list[int]]) -> None:
    """Re-mark which record is the table's row per matmul shape (``table_default``) after the
    table changed, and recompute the per-shape estimates from the records (no recompile)."""
    for r in doc["records"]:
        if r["path"] in ("gemv", "splitk", "gemm"):
            s, m = r["shape"], r["shape"]["M"]
            bucket = 1 if m == 1 else min(1 << (m - 1).bit_length(), 256)
            r["table_default"] = rows.get(f"{s['N']},{s['K']},{bucket}") == list(r["config"].values())
    doc["estimates"] = shape_estimates(doc["records"], doc["arch"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile the Triton kernels for sm_XX and inspect the SASS (no GPU)")
    ap.add_argument("--arch", type=int, choices=sorted(static.ARCH), required=True)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--sass-dir", type=Path, default=None, help="folder for the SASS listings")
    ap.add_argument("--paths", nargs="*", default=None, help="only these kernel paths (gemv splitk gemm conv dwconv)")
    ap.add_argument("--max-configs", type=int, default=None, help="first N configs per (kernel, shape)")
    ap.add_argument("--table", type=Path, default=None,
                    help="also write the best-estimate W4A16 configs into this per-GPU table "
                    "(kernels/tables/w4a16.json)")
    args = ap.parse_args(argv)
    doc = run(args.arch, args.sass_dir, args.paths, args.max_configs)
    doc["command"] = "python benchmarks/kernels_static.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.table:
        update_table(args.table, doc)
    write_json(args.out, doc)
    bad = [r for r in doc["records"] if r["spill_bytes"] or not r["fits"] or (r["w4"] and r["i2f_in_main_loop"])]
    for e in doc["estimates"]:
        d = e["default"]
        ratio = d["speedup_vs_fp16_estimate"]
        print(f"{e['path']:>6} {e['shape']}: estimate {d['estimate_us']:.1f}us (hbm {d['estimate_mem_us']:.1f}, "
              f"sm {d['estimate_sm_us']:.1f})" + (f", fp16 {e['fp16_us']:.1f}us, "
                                                        f"x{ratio:.2f} (estimate)" if ratio else ""))
    print(f"wrote {args.out}: {len(doc['records'])} records, {len(bad)} with spills / smem over limit / I2F in a "
          "W4 main loop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
