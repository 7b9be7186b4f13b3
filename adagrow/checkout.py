"""What the top-level folders ``compress/``, ``kernels/`` and ``grow/`` are when Python runs from a
checkout (the repository root on ``sys.path``) and something imports them by their short names,
as ``transformers`` does when it probes for the Hub package ``kernels``: an empty stand-in with no
submodules, never a second copy of ``adagrow.<name>`` (which would register its ops twice)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn


def stand_in(name: str) -> Callable[[str], NoReturn]:
    """The module ``__getattr__`` of the stand-in for the folder ``name``: every attribute is
    missing, with a message naming the real package."""
    def missing(attr: str) -> NoReturn:
        raise AttributeError(f"{name!r} here is the source folder of adagrow.{name}, not a package: "
                             f"import adagrow.{name} (module {name!r} has no attribute {attr!r})")
    return missing


def become_stand_in(namespace: dict[str, Any]) -> None:
    """Turn the package whose globals are ``namespace`` (``compress``/``kernels``/``grow`` imported
    by its short name) into the stand-in: no submodules, every attribute missing."""
    namespace["__getattr__"] = stand_in(namespace["__name__"])
    namespace["__path__"] = []  # no submodules: never a second copy
