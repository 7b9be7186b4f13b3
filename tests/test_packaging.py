"""The install contract: CLI entry point, namespace mapping, and CI running README's command."""
import re
import subprocess
import sys
from pathlib import Path

import adagrow

ROOT = Path(__file__).resolve().parents[1]  # the repository


def test_cli_version_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "adagrow.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"adagrow {adagrow.__version__}"
    out = subprocess.run([sys.executable, "-m", "adagrow.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: adagrow" in out.stdout


def test_namespace_packages_map_to_top_level_folders() -> None:
    import adagrow.compress
    import adagrow.grow
    import adagrow.kernels
    assert (Path(adagrow.compress.__file__).parent / "obs.py").is_file()
    assert (Path(adagrow.grow.__file__).parent / "reparam.py").is_file()
    assert adagrow.kernels.__name__ == "adagrow.kernels"


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme.split("## Quickstart")[1].split("\n## ")[0], re.S)
    assert len(blocks) == 2, "Quickstart must hold exactly two commands"
    assert "adagrow" in blocks[0] and "pytest" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert blocks[1].strip() in ci
