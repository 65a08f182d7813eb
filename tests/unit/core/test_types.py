"""The library type-checks: ``python -m mypy`` with pyproject's ``[tool.mypy]`` (strict, except
the modules its overrides list with the flags they relax) reports no error."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _cache_dir() -> Path:
    """mypy's incremental cache: in the virtualenv running the tests (so warm runs take a few
    seconds and the work tree stays clean), else in the temp folder."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / ".mypy_cache"
    return Path(tempfile.gettempdir()) / "tokiwa-mypy-cache"


def test_the_library_passes_mypy():
    probe = subprocess.run([sys.executable, "-c", "import mypy"], capture_output=True)
    assert probe.returncode == 0, "mypy is a test dependency (pip install -e '.[test]')"
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(_cache_dir())],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
