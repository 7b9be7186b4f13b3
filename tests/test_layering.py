"""Each public module imports alone in a fresh interpreter (docs/design.md §1: no cycles between layers)."""
import ast
import subprocess
import sys

import pytest

MODULES = ["adagrow.packed", "adagrow.kernels", "adagrow.kernels.w4a16", "adagrow.kernels.conv",
           "adagrow.kernels.modules", "adagrow.compress", "adagrow.compress.io",
           "adagrow.compress.qmodules", "adagrow.compress.export", "adagrow.grow", "adagrow.cli",
           "adagrow.bench", "adagrow.demo"]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module, tmp_path):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_packed_format_imports_nothing_else_from_adagrow(tmp_path):
    code = ("import sys, adagrow.packed; "
            "print(sorted(m for m in sys.modules if m.startswith('adagrow.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "['adagrow.packed']"


def test_kernels_do_not_import_compress_or_grow(tmp_path):
    code = ("import sys, adagrow.kernels; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('adagrow.')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    layers = set(ast.literal_eval(out))
    assert not layers & {"compress", "grow", "cli", "bench", "demo"}, layers
