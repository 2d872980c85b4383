"""The one switch over every fast path (docs/design.md, "Fast paths"): ``OLSS_FAST_FORCE_REFERENCE=1`` makes each
dispatch point (the fused sampler step, the batched evaluation of the re-fit programme) take its reference."""
from __future__ import annotations

import os

FORCE_REFERENCE_ENV = "OLSS_FAST_FORCE_REFERENCE"


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to something other than empty, 0, false, no or off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def reference_forced() -> bool:
    """``OLSS_FAST_FORCE_REFERENCE`` is set: every dispatch point takes its reference."""
    return env_flag(FORCE_REFERENCE_ENV)
