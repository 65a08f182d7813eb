"""One line makes ``import pyoco`` (and every ``pyoco.*`` module) resolve to :mod:`orchestrator.pyoco`::

    import orchestrator.pyoco.alias  # noqa: F401  - before the first `import pyoco`

It is the same as ``from orchestrator.pyoco import install_alias; install_alias()``;
``remove_alias()`` undoes it. If the real pyoco was imported first it refuses (StateError).
"""

from __future__ import annotations

from orchestrator.pyoco._alias import install_alias, remove_alias

install_alias()

__all__ = ["install_alias", "remove_alias"]
