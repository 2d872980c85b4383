"""The installed olss_fast version (one home: ``pyproject.toml``'s, as the package metadata gives it)."""
from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("olss_fast")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout that was never installed
    __version__ = "0+unknown"
