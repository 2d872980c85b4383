"""``compile_olss_pipeline(pipe, schedule, backend="onnxruntime" | "tensorrt")``: the pipeline-shaped runner.

:class:`ExportedOLSSRunner` is called exactly like :class:`olss_fast.runtime.OLSSRunner` (and like the pipeline:
``prompt``, ``negative_prompt``, ``prompt_embeds``, ``negative_prompt_embeds``, ``latents``, ``generator``,
``output_type``, ``return_dict``, ``height``, ``width``, ``num_images_per_prompt``, ``guidance_scale``) and returns
the same output objects. The host side (tokenisation, noise, post-processing) is the eager runner's own adapter
code; the program (text encoder → n × UNet + OLSS step → decoder) runs from an ONNX export
(:func:`olss_fast.export.onnx_export.export_onnx`):

* ``"onnxruntime"``: :class:`olss_fast.export.onnx_runner.OnnxOLSSRunner` (one ``session.run`` per component; the
  denoising loop is a single ONNX ``Loop``);
* ``"tensorrt"``: fp16 engines built from the same files (:mod:`olss_fast.export.tensorrt`), run in the fixed loop
  with the fused step, captured in a CUDA graph.

Everything an export bakes in is static, so every new (batch, height, width, guidance scale) signature gets its own
export, kept on disk under ``cache_dir`` (keyed by the hash of the weights, schedule, shapes and dtype: a second
process reuses it without exporting) and in an in-memory table of loaded programs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_BACKENDS", "ExportedOLSSRunner"]

EXPORT_BACKENDS = ("onnxruntime", "tensorrt")


class _OrtProgram:
    """The sampler program on onnxruntime (host numpy arrays in and out)."""

    def __init__(self, runner: Any, device: Any) -> None:
        self.runner = runner
        self.device = device

    def run(self, mode: str, cond: dict[str, Any], latents: Any, decode: bool) -> Any:
        import torch

        r = self.runner
        noise = latents.detach().cpu().numpy()
        if mode == "tokens":
            if "mask" in cond:
                raise ValueError("text encoders that take an attention mask are not supported by the ONNX export")
            c = r.encode(cond["ids"].cpu().numpy())
        elif mode == "embeds":
            c = cond["embeds"].detach().cpu().numpy()
        elif mode == "labels":
            c = cond["labels"].cpu().numpy()
        else:
            raise ValueError(f"unsupported conditioning mode {mode!r}")
        out = r.denoise(noise, c)
        if decode:
            out = r.decode(out)
        return torch.from_numpy(out).to(self.device)


class ExportedOLSSRunner:
    """A compiled OLSS sampler whose fixed loop runs from an ONNX export on onnxruntime or TensorRT.

    Build with :func:`olss_fast.compile_olss_pipeline` (``backend="onnxruntime"`` or ``"tensorrt"``).

    Attributes:
        pipe, schedule, backend, height, width, batch_size, guidance_scale: as for ``OLSSRunner``.
        dtype: the export dtype (``torch.float32`` / ``torch.float16``).
        cache_dir: where exports (``onnx/<key>``) and engines (``tensorrt/``) are cached.
        num_exports: how many exports were written (not reused) by this runner.
    """

    def __init__(self, pipe: Any, schedule: Any, *, backend: str, height: Optional[int] = None,
                 width: Optional[int] = None, batch_size: int = 1, guidance_scale: Optional[float] = None,
                 dtype: Any = None, cache_dir: Any = None, providers: Optional[Sequence[Any]] = None,
                 session_options: Any = None, use_cuda_graph: bool = True, step_backend: str = "auto") -> None:
        import torch

        from olss_fast.export.onnx_export import _pipeline_kind, default_cache_dir
        from olss_fast.runtime import _make_adapter, _pipe_device, check_init_args

        if backend not in EXPORT_BACKENDS:
            raise ValueError(f"unknown export backend {backend!r}; expected one of {EXPORT_BACKENDS}")
        if backend == "tensorrt":
            from olss_fast.export.tensorrt import require_tensorrt

            require_tensorrt()
        _pipeline_kind(pipe)  # ValueError for unsupported pipelines
        self.pipe = pipe
        self.adapter = _make_adapter(pipe)
        self.backend = backend
        self.device = _pipe_device(pipe)
        if backend == "tensorrt" and self.device.type != "cuda":
            raise ValueError(f"backend='tensorrt' needs the pipeline on a CUDA device, it is on {self.device}")
        self.dtype = dtype if dtype is not None else self.adapter.unet.dtype
        if self.dtype not in (torch.float32, torch.float16):
            raise ValueError(f"the ONNX/TensorRT backends support float32 and float16, got {self.dtype}")
        self.batch_size, self.height, self.width, self.guidance_scale = check_init_args(
            self.adapter, pipe, batch_size, height, width, guidance_scale
        )
        self.schedule = schedule
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.providers = providers
        self.session_options = session_options
        self.use_cuda_graph = use_cuda_graph
        self.step_backend = step_backend
        self.num_exports = 0
        self._programs: dict[tuple, Any] = {}
        self._exports: dict[tuple, Any] = {}

    @property
    def num_inference_steps(self) -> int:
        return int(self.schedule.num_steps)

    # ------------------------------------------------------------------ programs
    def _get_program(self, batch: int, height: int, width: int, guidance: float) -> Any:
        key = (batch, height, width, guidance)
        prog = self._programs.get(key)
        if prog is not None:
            return prog
        from olss_fast.export.onnx_export import export_plan, plan_export

        plan = plan_export(self.pipe, self.schedule, batch_size=batch, height=height, width=width,
                           guidance_scale=guidance, dtype=self.dtype)
        export = export_plan(plan, self.cache_dir / "onnx" / plan.key[:24], overwrite=True)
        if not export.reused:
            self.num_exports += 1
        self._exports[key] = export
        if self.backend == "onnxruntime":
            from olss_fast.export.onnx_runner import OnnxOLSSRunner

            # export_plan has just written or digest-checked the files: check sizes only here
            runner = OnnxOLSSRunner(export.path, providers=self._ort_providers(),
                                    session_options=self.session_options, verify=False)
            prog = _OrtProgram(runner, self.device)
        else:
            from olss_fast.export.tensorrt import TensorRTOLSSProgram, build_engines

            engines = build_engines(export.path, self.cache_dir / "tensorrt")
            prog = TensorRTOLSSProgram(engines, export.manifest, self.device, use_cuda_graph=self.use_cuda_graph,
                                       step_backend=self.step_backend)
        self._programs[key] = prog
        return prog

    def _ort_providers(self) -> Any:
        """The given providers; else CUDA (when the pipeline is on CUDA and onnxruntime has it), then CPU."""
        if self.providers is not None:
            return self.providers
        import onnxruntime as ort

        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def update_schedule(self, schedule: Any) -> None:
        """Use another schedule with the same number of steps (the next call exports it, or reuses its cache)."""
        from olss_fast.schedule import OLSSSchedule

        if not isinstance(schedule, OLSSSchedule):
            raise ValueError(f"expected an OLSSSchedule, got {type(schedule).__name__}")
        if schedule.num_steps != self.num_inference_steps:
            raise ValueError(f"update_schedule needs a schedule with {self.num_inference_steps} steps, got "
                             f"{schedule.num_steps}; compile a new runner for another step count")
        self.schedule = schedule
        self._programs.clear()
        self._exports.clear()

    def warmup(self, batch_size: Optional[int] = None, height: Optional[int] = None,
               width: Optional[int] = None) -> None:
        """Export (or load from the cache) the program for ``batch_size`` × ``height`` × ``width`` now."""
        self._get_program(int(batch_size or self.batch_size), int(height or self.height), int(width or self.width),
                          self.guidance_scale)

    def cache_info(self) -> dict[str, Any]:
        """Loaded programs (batch, height, width, guidance) and their export folders."""
        return {"entries": list(self._programs), "exports": {k: str(e.path) for k, e in self._exports.items()},
                "num_exports": self.num_exports, "cache_dir": str(self.cache_dir)}

    # ------------------------------------------------------------------ calling
    def __call__(self, prompt: Any = None, negative_prompt: Any = None, *, prompt_embeds: Any = None,
                 negative_prompt_embeds: Any = None, latents: Any = None, generator: Any = None,
                 output_type: str = "pil", return_dict: bool = True, height: Optional[int] = None,
                 width: Optional[int] = None, num_images_per_prompt: int = 1, guidance_scale: Optional[float] = None,
                 num_inference_steps: Optional[int] = None, **kwargs: Any) -> Any:
        """Sample like the pipeline (and like the eager ``OLSSRunner``); see its documentation."""
        import torch

        from olss_fast.runtime import check_call_args

        unknown = sorted(set(kwargs) - set(self.adapter.extra_kwargs))
        if unknown:
            raise ValueError(f"unsupported argument(s) {unknown} for the {self.backend} OLSS runner of a "
                             f"{self.adapter.name}")
        num_images, height, width, g = check_call_args(
            self, num_inference_steps, output_type, num_images_per_prompt, height, width, guidance_scale
        )
        guided = g > 1.0
        args = dict(kwargs, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds)
        with torch.no_grad():
            batch, mode, cond = self.adapter.prepare(args, guided, num_images, True, height, width)
            if mode == "embeds":
                cond = {k: v.to(self.dtype) for k, v in cond.items()}
            lat = self._prepare_latents(batch, height, width, latents, generator)
            program = self._get_program(batch, height, width, g)
            image = program.run(mode, cond, lat, output_type != "latent")
        return self.adapter.finish(image, output_type, return_dict)

    def _prepare_latents(self, batch: int, height: int, width: int, latents: Any, generator: Any) -> Any:
        """Initial noise exactly as ``OLSSRunner`` draws it (``randn_tensor``, ``init_noise_sigma`` = 1)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        shape = self.adapter.latent_shape(batch, height, width)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"batch size mismatch: {len(generator)} generators for an effective batch of {batch}")
        if latents is None:
            return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        if not isinstance(latents, torch.Tensor):
            raise ValueError(f"`latents` must be a tensor, got {type(latents).__name__}")
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"`latents` has shape {list(latents.shape)} but {list(shape)} is expected for batch "
                             f"{batch} at {height}x{width}")
        return latents.to(device=self.device, dtype=self.dtype)

    def __repr__(self) -> str:
        return (f"ExportedOLSSRunner({self.adapter.name}, backend={self.backend!r}, "
                f"steps={self.num_inference_steps}, dtype={self.dtype}, cache_dir={self.cache_dir})")
