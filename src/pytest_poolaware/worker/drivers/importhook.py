"""Noticing the first import of a driver's module, so its hooks go in only then.

A worker that never imports asyncpg should pay nothing for it: the hooks of a driver are
installed when the process has imported it (``sys.modules`` at install time, this
finder afterwards). Any other import costs one set lookup.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any


class _NotifyingLoader(importlib.abc.Loader):
    """Runs the real loader, then says the module is in (the driver can be hooked)."""

    def __init__(self, loader: Any, name: str, on_loaded: Callable[[str], None]) -> None:
        self._loader = loader
        self._name = name
        self._on_loaded = on_loaded

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._loader, attr)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        create: Callable[[importlib.machinery.ModuleSpec], types.ModuleType | None] | None
        create = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        self._on_loaded(self._name)


class ImportWatcher(importlib.abc.MetaPathFinder):
    """Notices the first import of a driver module (any other name costs one set lookup)."""

    def __init__(self, names: frozenset[str], on_loaded: Callable[[str], None]) -> None:
        self._names = names
        self._on_loaded = on_loaded

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec: importlib.machinery.ModuleSpec | None = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _NotifyingLoader(spec.loader, fullname, self._on_loaded)
            return spec
        return None
