"""Export of the fixed-step OLSS program: static ONNX (one ``Loop``), TensorRT engines, and their program backends.

* :func:`export_onnx` (:mod:`olss_fast.export.onnx_export`): text encoder, the n-step loop with the schedule baked in
  and the decoder as static-shape ONNX; planned by :mod:`olss_fast.export.plan`, the loop graph built by
  :mod:`olss_fast.export.graph`;
* :class:`OnnxOLSSRunner` (:mod:`olss_fast.export.onnx_runner`): numpy + onnxruntime only (a copy ships in every
  export folder);
* :func:`export_tensorrt` (:mod:`olss_fast.export.tensorrt`): fp16 engines built from those files, run in the fixed
  loop;
* :mod:`olss_fast.export.backends`: the ``"onnxruntime"`` and ``"tensorrt"`` backends of ``compile_olss_pipeline``.

The modules live in the repository's top-level ``export/`` folder (the design card's place for them); this package
links to them (docs/design.md, "Layers"). ``onnx`` and ``tensorrt`` are imported when first needed.
"""
from olss_fast.export.onnx_export import OnnxExport, export_onnx, export_plan
from olss_fast.export.onnx_runner import OnnxOLSSRunner
from olss_fast.export.plan import ExportPlan, plan_export
from olss_fast.export.tensorrt import build_engines, engine_cache_key, export_tensorrt

__all__ = ["ExportPlan", "OnnxExport", "OnnxOLSSRunner", "build_engines", "engine_cache_key", "export_onnx",
           "export_plan", "export_tensorrt", "plan_export"]
