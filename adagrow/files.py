"""Atomic file writes: a temp file in the destination folder, flushed to disk, then a rename, so a
crash never leaves a partial file where a good one was. Written files get the permissions a plain
``open()`` would give (``0666`` minus the umask, typically ``0644``) and folders ``0777`` minus the
umask (typically ``0755``), so a server running as another user can read them."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
    """While writing, SIGTERM raises ``SystemExit`` (in the main thread) so ``finally`` blocks
    remove temp files; SIGINT already raises ``KeyboardInterrupt``. The old handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)
    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _temp_name(folder: Path, suffix: str) -> tuple[int, str]:
    """A short hidden temp file in ``folder`` (final names may use all 255 bytes)."""
    return tempfile.mkstemp(prefix=".adagrow-", suffix=suffix, dir=folder)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = True) -> Path:
    """Call ``write(tmp_path)``, then move the result to ``path``. Returns ``path``.

    The file gets umask permissions and is fsynced before it is moved; the folder after. With
    ``overwrite=False`` the move is ``os.link`` (which fails if ``path`` exists, so two writers
    cannot both succeed) and ``FileExistsError`` is raised. A failed write (disk full, a signal)
    removes the temp file and leaves any previous ``path`` unchanged; the error is an ``OSError``
    naming ``path``.
    """
    path = Path(path)
    if len(os.fsencode(path.name)) > 255:
        raise OSError(errno.ENAMETOOLONG, f"{path}: the file name is longer than 255 bytes")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_name(path.parent, ".tmp")
    os.close(fd)
    try:
        with _cleanup_on_sigterm():
            try:
                write(tmp)
            except OSError:
                raise
            except Exception as exc:
                if type(exc).__name__ != "SafetensorError":
                    raise
                raise OSError(f"{path}: writing failed ({exc}); any previous file is unchanged") from exc
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync(tmp)
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
            _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_directory(path: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``fill(staging_dir)``, then move the folder to ``path`` (replacing it only with
    ``overwrite``). Files get umask permissions, folders too; everything is fsynced first. An
    existing folder is renamed aside, the new one renamed in, then the old one deleted: ``path``
    always holds one complete folder (or, between the two renames, none)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adagrow-", dir=path.parent))
    old = None
    try:
        with _cleanup_on_sigterm():
            fill(staging)
            _finish_tree(staging)
            if path.exists():
                if not overwrite:
                    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
                old = Path(tempfile.mkdtemp(prefix=".adagrow-old-", dir=path.parent))
                os.replace(path, old)  # the empty placeholder is replaced by the old folder
            os.rename(staging, path)
            _fsync(path.parent)
    except BaseException:
        if old is not None and not path.exists():
            os.rename(old, path)  # put the old folder back
            old = None
        raise
    finally:
        for leftover in (staging, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover)
    return path


def save_state(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict[str, Any],
               overwrite: bool = True) -> Path:
    """A state dict as safetensors with ``meta`` as JSON under the header key ``adagrow``
    (``overwrite=False``: ``FileExistsError`` if ``path`` exists, decided atomically)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"adagrow": json.dumps(meta)}),
                        overwrite)
def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` to ``path``, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
