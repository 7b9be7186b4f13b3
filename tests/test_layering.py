"""The layers of docs/design.md §1, enforced statically on every import in the source tree.

core (format/IO: packed, files, stored, schema, checks, the architecture registry, data, threads,
timing, ONNX Runtime sessions)
  -> kernels -> compress | grow (neither imports the other) -> export -> CLI / demo / bench.

Every ``import`` / ``from`` statement counts, function-level ones included (a lazy import is still
a dependency), as does ``importlib.import_module("<literal>")``.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package folder -> module prefix (adagrow/compress etc. are links to the top-level folders)
TREES = {"adagrow": "adagrow", "compress": "adagrow.compress", "kernels": "adagrow.kernels", "grow": "adagrow.grow"}
CORE = {"adagrow", "adagrow.packed", "adagrow.files", "adagrow.stored", "adagrow.schema", "adagrow.checks", "adagrow.archs",
        "adagrow.threads", "adagrow.timing", "adagrow.onnxrt", "adagrow.checkout", "adagrow.data", "adagrow.models", "adagrow.hf_text"}
ALLOWED = {"core": {"core"}, "kernels": {"core", "kernels"}, "compress": {"core", "kernels", "compress"},
           "grow": {"core", "kernels", "grow"}, "export": {"core", "kernels", "compress", "grow", "export"},
           "app": {"core", "kernels", "compress", "grow", "export", "app"}}


def layer(module: str) -> str:
    """The layer a module of the package belongs to (anything not listed is the application layer)."""
    if module in CORE:
        return "core"
    for prefix, name in (("adagrow.kernels", "kernels"), ("adagrow.compress.export", "export"),
                         ("adagrow.compress", "compress"), ("adagrow.grow", "grow")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "app"


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package under ``root`` (a checkout), by dotted name."""
    found = {}
    for folder, prefix in TREES.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "adagrow" and parts and parts[0] in ("compress", "kernels", "grow"):
                continue  # the links: their files are walked from the top-level folders
            found[".".join([prefix, *parts])] = path
    return found


def imports(module: str, path: Path) -> set[str]:
    """The adagrow modules ``module`` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import submodule`
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.add(node.args[0].value)
    return {m for m in out if m == "adagrow" or m.startswith("adagrow.")}


def violations(root: Path) -> list[str]:
    """``"a -> b (layer -> layer)"`` for every import that goes against the layer order."""
    found = modules(root)
    bad = []
    for module, path in found.items():
        for target in sorted(imports(module, path)):
            if target not in found and target.rsplit(".", 1)[0] in found:
                target = target.rsplit(".", 1)[0]  # `from pkg import name` where name is not a module
            if layer(target) not in ALLOWED[layer(module)]:
                bad.append(f"{module} -> {target} ({layer(module)} -> {layer(target)})")
    return bad


def test_the_source_tree_follows_the_layers():
    assert modules(ROOT)["adagrow.compress.export.onnx_export"].is_file()
    assert violations(ROOT) == []


@pytest.mark.parametrize("src,dst,line", [
    ("compress", "obs.py", "from adagrow.grow.reparam import RepConv2d"),
    ("grow", "budget.py", "    from adagrow.compress.export import export_onnx  # lazy, still a dependency"),
    ("kernels", "w4a16.py", "import adagrow.compress"),
    ("adagrow", "packed.py", "from .archs import lookup\nfrom . import bench"),
    ("compress", "model.py", "importlib.import_module('adagrow.grow.nets')"),
])
def test_a_planted_import_against_the_layers_is_caught(tmp_path, src, dst, line):
    for folder in TREES:
        (tmp_path / folder).mkdir()
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder)
            if folder == "adagrow" and rel.parts[0] in ("compress", "kernels", "grow"):
                continue
            (tmp_path / folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / rel).write_text(path.read_text())
    assert violations(tmp_path) == []
    with open(tmp_path / src / dst, "a") as f:
        f.write("\n\ndef planted():\n    import importlib\n" + "\n".join("    " + s.strip() for s in line.splitlines()) + "\n")
    assert violations(tmp_path), f"planting {line!r} in {src}/{dst} went unnoticed"


MODULES = ["adagrow.packed", "adagrow.archs", "adagrow.kernels", "adagrow.compress", "adagrow.compress.export",
           "adagrow.grow", "adagrow.cli", "adagrow.bench", "adagrow.demo"]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module, tmp_path):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_loading_a_grown_checkpoint_loads_no_compress_or_kernels(tmp_path):
    """The registry, not an import, connects a grown record to its builder."""
    code = ("import sys, torch; from adagrow.grow import GrowingCNN, save_grown, load_grown; "
            "save_grown(GrowingCNN('vgg', widths=(4, 8, 8)), 'g.safetensors'); load_grown('g.safetensors'); "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('adagrow.')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not {"compress", "kernels"} & set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert "triton" not in out.stdout


def test_top_level_folder_names_are_empty_stand_ins_not_second_copies():
    """From a checkout root, `kernels` (the Hub package transformers 5.25 imports), `compress` and
    `grow` are never second copies of adagrow's packages: the installed package of that name when
    there is one (transformers imports its names), else an empty stand-in with no submodules and a
    message naming the real package; transformers still imports."""
    code = ("import importlib.machinery, os, sys\n"
            "hub = importlib.machinery.PathFinder.find_spec('kernels', [p for p in sys.path if p not in ('', os.getcwd())])\n"
            "import kernels, compress, grow, transformers; from transformers import BertModel\n"
            "import adagrow.kernels, adagrow.compress\n"
            "assert compress.__path__ == [] and grow.__path__ == [] and 'adagrow.kernels' in sys.modules\n"
            "assert not [m for m in sys.modules if m.startswith(('compress.', 'grow.'))]\n"
            "if hub is None:\n    assert kernels.__path__ == []\n"
            "else:\n    assert kernels.__file__ == hub.origin, (kernels.__file__, hub.origin)\n"
            "try:\n    import compress.obs\nexcept ModuleNotFoundError:\n    pass\nelse:\n    raise SystemExit('second copy')\n"
            "try:\n    compress.quantize\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "import adagrow.compress" in out.stdout


def test_an_installed_package_named_like_a_folder_replaces_the_stand_in(tmp_path):
    """A package ``kernels`` further down sys.path (as the Hub's, which transformers imports) is
    what ``import kernels`` gives from a checkout root, submodules included."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'hub'\n")
    (tmp_path / "kernels" / "layer.py").write_text("VALUE = 7\n")
    code = ("import kernels, kernels.layer, adagrow.kernels\n"
            "print(kernels.CUDAProperties, kernels.layer.VALUE, type(adagrow.kernels.FusedConv2d).__name__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["hub", "7", "type"]
