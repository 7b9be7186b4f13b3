"""Atomic file writes: a temp file in the destination folder, flushed to disk, then a rename, so a
crash never leaves a partial file where a good one was. Written files get the permissions a plain
``open()`` would give (``0666`` minus the umask, typically ``0644``) and folders ``0777`` minus the
umask (typically ``0755``), so a server running as another user can read them."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races with threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_tree(root: str | os.PathLike) -> None:
    """Give every file and folder under ``root`` (included) umask permissions and fsync them."""
    mask = _umask()
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)
            _fsync(os.path.join(folder, name))
        for name in dirs:
            _fsync(os.path.join(folder, name))
        os.chmod(folder, 0o777 & ~mask)
    _fsync(root)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then move the result to ``path``. Returns ``path``.

    The file gets umask permissions and is fsynced before the rename; the folder after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_directory(path: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``fill(staging_dir)``, then move the folder to ``path`` (replacing it only with
    ``overwrite``). Files get umask permissions, folders too; everything is fsynced first."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(staging)
        _finish_tree(staging)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
        _fsync(path.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def save_state(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """A state dict as safetensors with ``meta`` as JSON under the header key ``adagrow``."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"adagrow": json.dumps(meta)}))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` to ``path``, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
