"""One registry per kind of thing (method, backbone, evaluation, dataset), timm-style.

Modules register themselves with a decorator; ``cropbench list`` reads the registries.
Registering a name twice is an error, asking for an unknown name lists the valid ones.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

from cropbench.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        module = getattr(obj, "__module__", "") or ""
        if module.split(".")[0] in ("methods", "evaluations"):
            raise ImportError(
                f"{module} was imported by its folder name; import it as cropbench.{module} "
                "(methods/ and evaluations/ install as cropbench.methods / cropbench.evaluations)"
            )
        if name in self._items:
            raise ValueError(f"duplicate {self.kind} name {name!r} (already {self._items[name]!r})")
        self._items[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            return self.add(name, obj)

        return deco

    def get(self, name: str) -> T:
        load_plugins()
        if name not in self._items:
            raise UnknownNameError(self.kind, name, list(self._items))
        return self._items[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._items


METHODS: Registry = Registry("method")
BACKBONES: Registry = Registry("backbone")
EVALUATIONS: Registry = Registry("evaluation")
DATASETS: Registry = Registry("dataset")

_PLUGIN_PACKAGES = ("cropbench.backbones", "cropbench.data", "cropbench.methods", "cropbench.evaluations")
_loaded = False


def load_plugins() -> None:
    """Import every module of the plugin packages so their decorators run (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # set first: plugin modules may import the registry while we walk
    try:
        for pkg_name in _PLUGIN_PACKAGES:
            pkg = importlib.import_module(pkg_name)
            for info in pkgutil.walk_packages(getattr(pkg, "__path__", []), prefix=pkg_name + "."):
                importlib.import_module(info.name)
    except BaseException:
        _loaded = False
        raise
