"""olss_fast: Optimal Linear Subspace Search (OLSS) few-step samplers for diffusers pipelines.

Duan et al., "Optimal Linear Subspace Search: Learning to Construct Fast and High-Quality Schedulers for Diffusion
Models", CIKM 2023 (arXiv 2305.14677). See docs/design.md for the math in the form the code uses.
"""
from __future__ import annotations

from typing import Any

from olss_fast.fit.orchestration import FitConfig, FitResult, fit_olss_scheduler
from olss_fast.fit.recording import RecordConfig, record_trajectories
from olss_fast.core.refine import refine_schedule
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.serve.scheduler import OLSSScheduler
from olss_fast.core.search import SearchConfig, search_schedule
from olss_fast.core.stats import GramStats

__version__ = "0.1.0"

__all__ = [
    "GramStats", "search_schedule", "refine_schedule", "OLSSSchedule", "OLSSScheduler", "compile_olss_pipeline",
    "OLSSRunner", "fit_olss_scheduler", "record_trajectories", "RecordConfig", "FitConfig", "FitResult", "SearchConfig",
]


def __getattr__(name: str) -> Any:
    # the runtime pulls in the compiled-loop machinery; import it only when asked for
    if name in ("compile_olss_pipeline", "OLSSRunner"):
        from olss_fast.serve import runner as runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'olss_fast' has no attribute {name!r}")
