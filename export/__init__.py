"""Export of the fixed-step OLSS loop: CUDA graphs, ONNX, TensorRT (import as olss_fast.export).

Kept light: importing ``olss_fast.export`` loads no torch, onnx, onnxruntime or tensorrt by itself; the names below
are resolved on first use.

* :mod:`olss_fast.export.onnx_export` — :func:`export_onnx`: text encoder, the n-step loop (one ONNX ``Loop``, the
  schedule baked in, UNet weights stored once) and VAE decoder as static-shape ONNX;
* :mod:`olss_fast.export.onnx_runner` — :class:`OnnxOLSSRunner`, numpy + onnxruntime only (a copy ships in every
  export folder);
* :mod:`olss_fast.export.tensorrt` — fp16 TensorRT engines built from those files, cached on disk, run in the fixed
  loop (CUDA graph when possible);
* :mod:`olss_fast.export.backends` — the ``"onnxruntime"`` and ``"tensorrt"`` program backends of
  ``compile_olss_pipeline``;
* :mod:`olss_fast.export.cli` — ``olss-fast export``.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_onnx": "onnx_export",
    "export_plan": "onnx_export",
    "plan_export": "onnx_export",
    "OnnxExport": "onnx_export",
    "extract_unet_model": "onnx_export",
    "OnnxOLSSRunner": "onnx_runner",
    "export_tensorrt": "tensorrt",
    "build_engines": "tensorrt",
    "engine_cache_key": "tensorrt",
    "OnnxRuntimeBackend": "backends",
    "TensorRTBackend": "backends",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'olss_fast.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
