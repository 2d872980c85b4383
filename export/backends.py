"""The exported program backends of :class:`olss_fast.serve.runner.OLSSRunner`: ``"onnxruntime"`` and ``"tensorrt"``.

The runner's front end (validation, the adapter's host side, post-processing) is the same as for ``eager``; these
backends run the program from an ONNX export (:func:`olss_fast.export.onnx_export.export_onnx`):

* ``"onnxruntime"``: :class:`olss_fast.export.onnx_runner.OnnxOLSSRunner` (one ``session.run`` per component; the
  denoising loop is a single ONNX ``Loop``);
* ``"tensorrt"``: fp16 engines built from the same files (:mod:`olss_fast.export.tensorrt`), run in the shared loop
  (:func:`olss_fast.serve.program.run_loop`) with the fused step, captured in a CUDA graph.

Everything an export bakes in is static, so every (batch, height, width, guidance scale) signature gets its own
export, kept on disk under ``cache_dir`` (keyed by the hash of the weights, schedule, shapes and dtype: a second
process reuses it without exporting) and in a size-bounded in-memory cache of loaded programs. When the pipeline's
weights change (the runner compares a sampled digest of their values before every call) the programs are dropped and
the next call exports the new weights.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from olss_fast.core.checks import warn_once
from olss_fast.core.files import default_cache_dir
from olss_fast.export.folders import mark_used, trim_export_cache
from olss_fast.export.onnx_export import export_plan, plan_export
from olss_fast.export.onnx_runner import OnnxOLSSRunner
from olss_fast.export.tensorrt import TensorRTOLSSProgram, build_engines, require_tensorrt
from olss_fast.pipelines.base import CallOptions
from olss_fast.serve.backend import BackendSetup, ProgramBackend, ProgramRequest, register_backend
from olss_fast.serve.cuda_graph import GraphCache

logger = logging.getLogger(__name__)

__all__ = ["OnnxRuntimeBackend", "TensorRTBackend"]


class _OrtProgram:
    """The sampler program on onnxruntime (host numpy arrays in and out)."""

    def __init__(self, runner: Any, device: Any) -> None:
        self.runner = runner
        self.device = device

    def run(self, mode: str, cond: dict[str, Any], latents: Any, decode: bool, names: dict[str, str]) -> Any:
        r = self.runner
        noise = latents.detach().cpu().numpy()
        if mode == "tokens":
            if "mask" in cond:
                raise ValueError("text encoders that take an attention mask are not supported by the ONNX export")
            c: Any = r.encode(cond["ids"].cpu().numpy())
        else:  # the adapter's inputs under the export's input names
            c = {names[k]: v.detach().cpu().numpy() for k, v in cond.items()}
        out = r.denoise(noise, c)
        if decode:
            out = r.decode(out)
        return torch.from_numpy(out).to(self.device)


class _ExportedBackend(ProgramBackend):
    """Shared plumbing: one exported program per (batch, height, width, guidance) in a bounded cache."""

    name = "exported"
    #: the weights are baked into the export: a change of their values must rebuild it
    needs_weight_values = True

    def __init__(self, setup: BackendSetup) -> None:
        super().__init__(setup)
        cfg = setup.config
        if setup.dtype not in (torch.float32, torch.float16):
            raise ValueError(f"the ONNX/TensorRT backends support float32 and float16, got {setup.dtype}")
        setup.adapter.check_exportable()
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_dir()
        self.cache: GraphCache[Any] = GraphCache(cfg.cache_size)  # export cache key → loaded program
        self._plans: GraphCache[Any] = GraphCache(4 * cfg.cache_size)  # request signature → (export, input names)
        self.num_exports = 0

    def invalidate(self) -> None:
        self.cache.clear()
        self._plans.clear()

    def schedule_changed(self) -> None:
        self.invalidate()

    def _check(self, req: ProgramRequest) -> None:
        if req.options != CallOptions():
            raise ValueError(f"clip_skip, cross_attention_kwargs and guidance_rescale are not supported by the "
                             f"{self.name} backend (the exported program is fixed); use backend='eager' or "
                             "'cuda_graph'")
        if req.on_step is not None:
            raise ValueError(f"callback_on_step_end is not supported by the {self.name} backend; use backend='eager'")

    def _export(self, req: ProgramRequest) -> Any:
        r = self.setup
        cond = {k: v for k, v in req.inputs.items() if k != "latents"}
        plan = plan_export(r.pipe, r.state.schedule, batch_size=req.batch, height=req.height, width=req.width,
                           guidance_scale=req.guidance if req.guided else 1.0, dtype=r.dtype,
                           allow_mismatch=r.config.allow_mismatch, example=cond if req.mode == "embeds" else None)
        folder = self.cache_dir / "onnx"
        if not (folder / plan.key[:24]).is_dir() and not req.warmup:
            warn_once(("export-on-call", id(self), plan.key), "this call exports the %d-step program to ONNX for a new "
                      "input (batch %d, %dx%d, guidance %s): slow once (minutes for a real model); build it ahead with "
                      "compile_olss_pipeline(..., warmup=[(batch, height, width), ...])", r.state.num_steps,
                      req.batch, req.height, req.width, req.guidance if req.guided else "off", logger=logger)
        export = export_plan(plan, folder / plan.key[:24], overwrite=True)
        mark_used(export.path)
        if not export.reused:
            self.num_exports += 1
            if r.config.export_cache_bytes is not None:
                trim_export_cache(folder, r.config.export_cache_bytes, keep=export.path)
        return export, {c.key: c.name for c in plan.cond}

    def run(self, req: ProgramRequest) -> torch.Tensor:
        self._check(req)
        cond = {k: v for k, v in req.inputs.items() if k != "latents"}
        signature = (req.batch, req.height, req.width, req.guidance if req.guided else 1.0, req.mode,
                     tuple((k, tuple(v.shape)) for k, v in sorted(cond.items())))
        planned = self._plans.get(signature)
        if planned is None:  # (token and embedding calls of one size share one export)
            planned = self._export(req)
            self._plans.put(signature, planned)
        export, names = planned
        prog = self.cache.get(export.cache_key)
        if prog is None:
            prog = self._load(export)
            self.cache.put(export.cache_key, prog)
        # (the programs cast the inputs to the export's dtypes)
        return prog.run(req.mode, cond, req.inputs["latents"], req.decode, names)

    def _load(self, export: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def cache_info(self) -> dict[str, Any]:
        c = self.cache
        return {"entries": c.keys(), "size": len(c), "max_size": c.max_size, "hits": c.hits, "misses": c.misses,
                "evictions": c.evictions, "num_exports": self.num_exports, "cache_dir": str(self.cache_dir)}


class OnnxRuntimeBackend(_ExportedBackend):
    name = "onnxruntime"

    def _providers(self) -> Any:
        """The configured providers; else CUDA (when the pipeline is on CUDA and onnxruntime has it), then CPU."""
        cfg = self.setup.config
        if cfg.providers is not None:
            return list(cfg.providers)
        import onnxruntime as ort

        if self.setup.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _load(self, export: Any) -> Any:
        # export_plan has just written or digest-checked the files: check sizes only here
        ort_runner = OnnxOLSSRunner(export.path, providers=self._providers(),
                                    session_options=self.setup.config.session_options, verify=False)
        return _OrtProgram(ort_runner, self.setup.device)


class TensorRTBackend(_ExportedBackend):
    name = "tensorrt"

    def __init__(self, setup: BackendSetup) -> None:
        require_tensorrt()
        if setup.device.type != "cuda":
            raise ValueError(f"backend='tensorrt' needs the pipeline on a CUDA device, it is on {setup.device}")
        super().__init__(setup)

    def _load(self, export: Any) -> Any:
        engines = build_engines(export.path, self.cache_dir / "tensorrt")
        return TensorRTOLSSProgram(engines, export.manifest, self.setup.device,
                                   use_cuda_graph=self.setup.config.use_cuda_graph,
                                   step_backend=self.setup.config.step_backend)


register_backend("onnxruntime", OnnxRuntimeBackend)
register_backend("tensorrt", TensorRTBackend)
