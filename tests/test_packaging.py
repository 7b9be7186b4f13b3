"""The install contract: CLI entry point, the wheel users install, CI running README's command."""
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import adagrow

ROOT = Path(__file__).resolve().parents[1]  # the repository


def test_cli_version_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "adagrow", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"adagrow {adagrow.__version__}"
    out = subprocess.run([sys.executable, "-m", "adagrow.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: adagrow" in out.stdout


def source_packages(root: Path) -> set[str]:
    """Every package (a folder with ``__init__.py``) of the ``adagrow`` tree, links followed."""
    base = root / "adagrow"
    return {".".join(("adagrow", *Path(folder).relative_to(base).parts))
            for folder, _, files in os.walk(base, followlinks=True) if "__init__.py" in files}


def missing_from_wheel(names: list[str], root: Path) -> list[str]:
    """The packages and data files of the source tree that a wheel's file list lacks."""
    have = set(names)
    missing = [pkg for pkg in sorted(source_packages(root))
               if "/".join(pkg.split(".")) + "/__init__.py" not in have]
    data = ["adagrow/py.typed", "adagrow/kernels/tables/w4a16.json",
            *(f"adagrow/text/{p.name}" for p in (root / "adagrow" / "text").glob("*.txt"))]
    return missing + [d for d in data if d not in have]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("adagrow-*.whl")
    return path


def test_the_wheel_ships_every_package_and_its_data(wheel) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "adagrow/compress/export/__init__.py" in names  # the subpackage an old setup.py forgot
    assert missing_from_wheel(names, ROOT) == []
    assert not [n for n in names if n.split("/")[0] in ("compress", "kernels", "grow", "tests", "benchmarks")]


def test_the_wheel_check_fails_for_a_forgotten_subpackage(wheel, tmp_path) -> None:
    names = [n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("adagrow/compress/export/")]
    assert missing_from_wheel(names, ROOT) == ["adagrow.compress.export"]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme.split("## Quickstart")[1].split("\n## ")[0], re.S)
    assert len(blocks) == 2, "Quickstart must hold exactly two commands"
    assert "adagrow demo" in blocks[0] and "pytest" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert blocks[1].strip() in ci
    assert any("pip wheel" in line for line in ci), "CI must build and install the wheel users get"


def test_mypy_resolves_every_adagrow_import_from_a_checkout(tmp_path) -> None:
    """Static tools see the same package as Python (adagrow/compress etc. are plain links)."""
    pytest.importorskip("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy", "-p", "adagrow", "--ignore-missing-imports",
                          "--cache-dir", str(tmp_path / "cache")],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    checked = re.search(r"(\d+) source files", out.stdout)
    assert checked and int(checked.group(1)) >= 50, out.stdout[-2000:] + out.stderr[-2000:]
    unresolved = [line for line in out.stdout.splitlines() if "import-not-found" in line
                  or re.search(r'Module "adagrow[.\w]*" has no attribute', line)]
    assert unresolved == [], "\n".join(unresolved[:20])


def test_grow_help_names_every_data_source() -> None:
    out = subprocess.run([sys.executable, "-m", "adagrow", "grow", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for kind in ("digits", "cluttered[:difficulty]", "cifar10:", "npz:"):
        assert kind in text, kind
