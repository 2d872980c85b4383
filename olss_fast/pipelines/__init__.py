"""Pipeline families as plug-ins: one adapter per family (see :mod:`olss_fast.pipelines.base` for the contract).

A new family is one file with a :class:`~olss_fast.pipelines.base.PipelineAdapter` subclass, registered here with
:func:`register_adapter`; the runtime, the recording and the exporters find it through :func:`adapter_for`.
"""
from __future__ import annotations


from olss_fast.pipelines.base import CallOptions, CondInput, ExportSpec, PipelineAdapter, Prepared
from olss_fast.pipelines.digits import DigitsAdapter
from olss_fast.pipelines.flux import FluxAdapter
from olss_fast.pipelines.registry import adapter_for, register_adapter, supported_pipelines
from olss_fast.pipelines.sd import StableDiffusionAdapter
from olss_fast.pipelines.sd3 import StableDiffusion3Adapter
from olss_fast.pipelines.sdxl import StableDiffusionXLAdapter

__all__ = ["CallOptions", "CondInput", "ExportSpec", "PipelineAdapter", "Prepared", "adapter_for",
           "register_adapter", "supported_pipelines"]

for _cls in (StableDiffusionAdapter, StableDiffusionXLAdapter, StableDiffusion3Adapter, FluxAdapter, DigitsAdapter):
    register_adapter(_cls)
