"""What the top-level folders ``compress/``, ``kernels/`` and ``grow/`` are when Python runs from a
checkout (the repository root on ``sys.path``) and something imports them by their short names,
as ``transformers`` does with the Hub package ``kernels`` (a dependency of transformers 5.25):
the installed package of that name when there is one further down ``sys.path``, else an empty
stand-in with no submodules; never a second copy of ``adagrow.<name>`` (which would register its
ops twice)."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn


def stand_in(name: str) -> Callable[[str], NoReturn]:
    """The module ``__getattr__`` of the stand-in for the folder ``name``: every attribute is
    missing, with a message naming the real package."""
    def missing(attr: str) -> NoReturn:
        raise AttributeError(f"{name!r} here is the source folder of adagrow.{name}, not a package: "
                             f"import adagrow.{name} (module {name!r} has no attribute {attr!r})")
    return missing


def _installed(name: str, checkout: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of a module ``name`` found on ``sys.path`` outside the checkout root ``checkout``."""
    path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != checkout]
    return importlib.machinery.PathFinder.find_spec(name, path)


def become_stand_in(namespace: dict[str, Any]) -> None:
    """Handle the package whose globals are ``namespace`` (``compress``/``kernels``/``grow``
    imported by its short name): put the installed package of that name in its place in
    ``sys.modules`` (what the import then returns), or with none turn it into the stand-in:
    no submodules, every attribute missing."""
    name = namespace["__name__"]
    checkout = os.path.dirname(os.path.dirname(os.path.realpath(namespace["__file__"])))
    spec = _installed(name, checkout)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return
    namespace["__getattr__"] = stand_in(name)
    namespace["__path__"] = []  # no submodules: never a second copy
