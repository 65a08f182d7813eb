"""How ``import pyoco`` (and every ``pyoco.*`` module) resolves to :mod:`orchestrator.pyoco`.

:func:`install_alias` (what ``import orchestrator.pyoco.alias`` calls) puts a finder first on
``sys.meta_path``. ``pyoco.X.Y`` is then the very module object ``orchestrator.pyoco.X.Y``, so ``unittest.mock.patch("pyoco.x.y.z")``
patches tokiwa's module. Names only: nothing of pyoco's own code is involved, and a
``pyoco.*`` module this surface does not have (``pyoco.server``, ``pyoco.cli``) is a
ModuleNotFoundError. If the real pyoco was imported first, :func:`install_alias` refuses.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

from orchestrator.errors import StateError

ALIAS = "pyoco"
TARGET = "orchestrator.pyoco"


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module is already executed."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != ALIAS and not fullname.startswith(ALIAS + "."):
            return None
        real = TARGET + fullname[len(ALIAS):]
        try:
            found = importlib.util.find_spec(real)
        except ModuleNotFoundError:
            return None
        if found is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real),
                                               is_package=found.submodule_search_locations is not None)


_FINDER = _AliasFinder()


def install_alias() -> None:
    """Make ``import pyoco`` mean ``import orchestrator.pyoco`` in this process (idempotent)."""
    current = sys.modules.get(ALIAS)
    if current is not None and current.__name__ != TARGET:
        raise StateError(f"the real pyoco is already imported (from {getattr(current, '__file__', '?')}); "
                         "install the alias before the first `import pyoco`")
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def remove_alias() -> None:
    """Undo :func:`install_alias` (drops the ``pyoco*`` names from ``sys.modules`` too)."""
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    for name in [n for n in sys.modules if n == ALIAS or n.startswith(ALIAS + ".")]:
        if sys.modules[name].__name__.startswith(TARGET):
            del sys.modules[name]

