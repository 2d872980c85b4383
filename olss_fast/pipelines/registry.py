"""The registry of pipeline families: :func:`adapter_for` finds the adapter of a pipeline's family."""
from __future__ import annotations

from typing import Any, Optional

from olss_fast.pipelines.base import PipelineAdapter

__all__ = ["adapter_for", "register_adapter", "supported_pipelines"]

_ADAPTERS: list[type[PipelineAdapter]] = []


def register_adapter(cls: type[PipelineAdapter]) -> type[PipelineAdapter]:
    """Add a pipeline family (usable as a class decorator). Later registrations are tried first, so a subclass
    pipeline's adapter can take precedence over its base class's."""
    if not (isinstance(cls, type) and issubclass(cls, PipelineAdapter)):
        raise ValueError(f"register_adapter takes a PipelineAdapter subclass, got {cls!r}")
    if cls not in _ADAPTERS:
        _ADAPTERS.insert(0, cls)
    return cls


def supported_pipelines() -> list[str]:
    """Names of the registered pipeline families."""
    return [cls.name for cls in reversed(_ADAPTERS)]


def adapter_for(pipe: Any, required: bool = True) -> Optional[PipelineAdapter]:
    """The adapter of ``pipe``'s family; ``ValueError`` naming the supported pipelines (or None, ``required=False``)."""
    for cls in _ADAPTERS:
        try:
            ok = cls.matches(pipe)
        except ImportError:  # pragma: no cover - an optional diffusers class missing in this version
            ok = False
        if ok:
            return cls(pipe)
    if not required:
        return None
    raise ValueError(
        f"{type(pipe).__name__} is not supported by the OLSS runtime; supported pipelines: "
        + ", ".join(supported_pipelines())
    )
