"""The documentation holds: every ```python block of README.md and docs/*.md runs as written, the
README stays short, and no file cites a document outside the repository."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", re.M | re.S)
NEEDS = "# needs:"
SNIPPET_TIMEOUT_S = 120  # a snippet is written to take < 20 s; this bound only stops a hung one
SKIP_PARTS = {".git", "build", "dist", "demo_out", "__pycache__", "node_modules"}
OUTSIDE_DOC = re.compile(r"(?:\.\./)+[\w./-]*\.(?:md|rst|txt)\b")  # a document above the repository
MD_RELATIVE = re.compile(r"(?<![\w/.])((?:\.\./)+[\w./-]+)")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, dedented code) of each fenced ```python block in a markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group(2))) for m in BLOCK.finditer(text)]


BLOCKS = [(f"{path.relative_to(ROOT)}:{line}", code) for path in DOCS for line, code in python_blocks(path)]
SNIPPETS = [pytest.param(code, id=name) for name, code in BLOCKS]


def repo_files(*suffixes: str) -> list[Path]:
    """The repository's own files with these suffixes (no VCS, build or output folders, no symlinked copies)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):  # os.walk does not follow the adagrow/* symlinks
        dirnames[:] = [d for d in dirnames if d not in SKIP_PARTS and not d.startswith(".")
                       and not d.endswith(".egg-info")]
        out += [Path(dirpath) / f for f in filenames if f.endswith(suffixes)]
    return sorted(out)


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs_as_written(code: str, tmp_path: Path) -> None:
    first = code.lstrip().splitlines()[0]
    if first.startswith(NEEDS):
        pytest.skip(first[len(NEEDS):].strip())
    # Only the package is put on the path, as after an install: the repository root itself would also
    # expose its top-level folders (kernels/, compress/, grow/) under names other libraries look up.
    path, work = tmp_path / "path", tmp_path / "work"
    path.mkdir()
    work.mkdir()
    (path / "adagrow").symlink_to(ROOT / "adagrow", target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                         timeout=SNIPPET_TIMEOUT_S)
    assert out.returncode == 0, f"snippet failed (exit {out.returncode}):\n{out.stderr[-4000:]}"


def test_there_are_snippets_to_run() -> None:
    runnable = [name for name, code in BLOCKS if not code.lstrip().startswith(NEEDS)]
    assert len(runnable) >= 3, "README and docs should carry runnable examples"


def test_readme_is_short() -> None:
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; move detail to docs/"


def test_no_citation_of_a_document_outside_the_repository() -> None:
    bad = []
    for path in repo_files(".py", ".md"):
        text = path.read_text(errors="replace")
        rel = path.relative_to(ROOT)
        if "shared/" + "DESIGN" in text or re.search(r"\b" + "DESIGN" + " §", text):
            bad.append(f"{rel}: cites the shared design document; cite docs/design.md §N")
        if path.suffix == ".py":
            bad += [f"{rel}: {m.group(0)}" for m in OUTSIDE_DOC.finditer(text)]
            continue
        for m in MD_RELATIVE.finditer(text):
            target = (path.parent / m.group(1)).resolve()
            if not target.is_relative_to(ROOT):
                bad.append(f"{rel}: {m.group(1)} is outside the repository")
    assert not bad, "\n".join(bad)


def test_design_sections_cited_in_code_exist() -> None:
    sections = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / "design.md").read_text(), re.M))
    cited = set()
    for path in repo_files(".py"):
        for m in re.finditer(r"docs/design\.md §(\d+)(?:-(\d+))?", path.read_text(errors="replace")):
            cited |= {s for s in m.groups() if s}
    assert cited, "code should cite docs/design.md"
    assert cited <= sections, f"cited sections missing from docs/design.md: {sorted(cited - sections)}"


def test_relative_links_resolve() -> None:
    bad = []
    for path in [*DOCS, ROOT / "CHANGELOG.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"(https?|mailto):", target) or target.startswith("#"):
                continue  # a URL or an anchor
            if target.startswith(("/", "file:")):
                bad.append(f"{path.relative_to(ROOT)}: {target} (an absolute path)")
                continue
            if not (path.parent / target.split("#")[0]).exists():
                bad.append(f"{path.relative_to(ROOT)}: {target}")
    assert not bad, "links to missing files:\n" + "\n".join(bad)
