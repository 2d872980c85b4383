"""olss_fast: Optimal Linear Subspace Search (OLSS) few-step samplers for diffusers pipelines.

Duan et al., "Optimal Linear Subspace Search: Learning to Construct Fast and High-Quality Schedulers for Diffusion
Models", CIKM 2023 (arXiv 2305.14677). docs/design.md has the math in the form the code uses and the layers:
``olss_fast.core`` (math, formats, checks) → ``olss_fast.kernels`` / ``olss_fast.models`` → ``olss_fast.pipelines``
→ ``olss_fast.serve`` → ``olss_fast.fit`` / ``olss_fast.export``. This module only gathers the public names.
"""
from __future__ import annotations

from olss_fast.core.refine import refine_schedule, refit_path_search
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.search import SearchConfig, search_schedule
from olss_fast.core.stats import GramStats
from olss_fast.core.version import __version__
from olss_fast.export import backends as _export_backends  # noqa: F401  (registers "onnxruntime" and "tensorrt")
from olss_fast.fit.config import FitConfig, RecordConfig
from olss_fast.fit.orchestration import FitResult, fit_olss_scheduler
from olss_fast.fit.recording import record_trajectories
from olss_fast.serve.config import RuntimeConfig
from olss_fast.serve.runner import OLSSRunner, compile_olss_pipeline
from olss_fast.serve.scheduler import OLSSScheduler
from olss_fast.serve.schedules import use_olss_scheduler

__all__ = [
    "GramStats", "search_schedule", "refine_schedule", "refit_path_search", "OLSSSchedule", "OLSSScheduler",
    "use_olss_scheduler", "compile_olss_pipeline", "OLSSRunner", "RuntimeConfig", "fit_olss_scheduler", "record_trajectories",
    "RecordConfig", "FitConfig", "FitResult", "SearchConfig", "__version__",
]
