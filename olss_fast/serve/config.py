"""Options of :func:`~olss_fast.serve.runner.compile_olss_pipeline`: one typed :class:`RuntimeConfig`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from olss_fast.core import checks
from olss_fast.core.provenance import check_allow

#: the program backends by name: the PyTorch ones (:mod:`olss_fast.serve.torch_backend`) and the exported ones
#: (registered by :mod:`olss_fast.export.backends`)
TORCH_BACKENDS = ("eager", "cuda_graph")
EXPORTED_BACKENDS = ("onnxruntime", "tensorrt")
BACKEND_NAMES = TORCH_BACKENDS + EXPORTED_BACKENDS


# ==================================================================================================== configuration
@dataclass(frozen=True)
class RuntimeConfig:
    """Options of :func:`compile_olss_pipeline` (one object instead of loose keyword arguments).

    Attributes:
        backend: ``"auto"`` (``cuda_graph`` on CUDA, else ``eager``), ``"eager"``, ``"cuda_graph"``,
            ``"onnxruntime"`` or ``"tensorrt"``.
        height, width: default image size (the pipeline's default when None); calls may override.
        batch_size: the batch :meth:`OLSSRunner.warmup` prepares (calls may use other batches: each new input
            signature gets its own program instance, kept in an LRU cache of ``cache_size``).
        guidance_scale: classifier-free guidance scale (> 1 enables CFG); None: the default of the pipeline's
            ``__call__``; calls may override.
        dtype: convert the pipeline's modules to this dtype first (in place); None keeps the denoiser's.
        compile: ``torch.compile`` (inductor, static shapes) the program's modules: ``True`` for all of them, or a
            tuple of ``"text_encoder"`` (the encoder that runs inside the program), ``"denoiser"`` and ``"decoder"``
            (eager and cuda_graph backends; inside the one CUDA graph with ``cuda_graph``). The first call of each
            input signature compiles (see ``warmup`` of :func:`compile_olss_pipeline`).
        compile_mode: ``torch.compile``'s mode: None (its default), ``"max-autotune-no-cudagraphs"`` (opt-in: minutes
            of autotuning per module on a GPU); ``"reduce-overhead"`` / ``"max-autotune"`` capture CUDA graphs of
            their own and are refused with ``backend="cuda_graph"``, which captures the whole program already.
        compile_cache: keep the compiled artefacts on disk under ``cache_dir/compile`` (:mod:`olss_fast.serve.compile_cache`,
            keyed by the modules' digests, shapes, dtype, software versions and device), so that another process
            loads them instead of compiling again; a corrupted or stale entry is ignored with a warning.
        channels_last: convert the pipeline's convolutional modules to ``torch.channels_last`` (in place).
        fuse_qkv: fuse the attention projections of the modules diffusers offers it for (``fuse_qkv_projections``,
            in place; refused on modules with LoRA adapters, whose fused weights would silently drop the LoRA).
        cache_size: program instances (captured graphs, exports) kept per runner.
        warmup_iters: eager iterations on a side stream before each CUDA-graph capture.
        step_backend: fused-step backend (``"auto"``, ``"triton"``, ``"reference"``).
        cache_dir: where compiled artefacts, exports and engines are kept (default ``$OLSS_FAST_CACHE`` or
            ``~/.cache/olss_fast``).
        export_cache_bytes: onnxruntime / tensorrt: the exports kept under ``cache_dir/onnx`` are bounded to this
            many bytes (the least recently used are removed after a new export; default 20 GiB, None: no bound).
        allow_mismatch: accept a schedule fitted for another ``"model"``, ``"noise_schedule"`` or
            ``"prediction_type"`` (see :mod:`olss_fast.core.provenance`).
        providers, session_options: onnxruntime execution providers and session options (default: CUDA when the
            pipeline is on CUDA and onnxruntime has it, then CPU).
        use_cuda_graph: tensorrt: capture the engine loop in a CUDA graph.
    """

    backend: str = "auto"
    height: Optional[int] = None
    width: Optional[int] = None
    batch_size: int = 1
    guidance_scale: Optional[float] = None
    dtype: Optional[torch.dtype] = None
    compile: Union[bool, tuple[str, ...]] = False
    compile_mode: Optional[str] = None
    compile_cache: bool = True
    channels_last: bool = False
    fuse_qkv: bool = False
    cache_size: int = 4
    warmup_iters: int = 2
    step_backend: str = "auto"
    cache_dir: Optional[Union[str, os.PathLike]] = None
    export_cache_bytes: Optional[int] = 20 * 2**30
    allow_mismatch: tuple[str, ...] = ()
    providers: Optional[tuple] = None
    session_options: Any = None
    use_cuda_graph: bool = True

    def __post_init__(self) -> None:
        checks.choice(self.backend, "backend", ("auto",) + BACKEND_NAMES)
        for name in ("height", "width"):
            checks.optional(checks.integer, getattr(self, name), name, 1)
        for name in ("batch_size", "cache_size", "warmup_iters"):
            checks.integer(getattr(self, name), name, 1)
        checks.optional(checks.integer, self.export_cache_bytes, "export_cache_bytes", 0)
        object.__setattr__(self, "guidance_scale", checks.optional(checks.real, self.guidance_scale, "guidance_scale"))
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype (e.g. torch.float16), got {self.dtype!r}")
        checks.choice(self.step_backend, "step_backend", ("auto", "triton", "reference"))
        for name in ("use_cuda_graph", "compile_cache", "channels_last", "fuse_qkv"):
            checks.boolean(getattr(self, name), name)
        object.__setattr__(self, "compile", check_compile_parts(self.compile))
        checks.choice(self.compile_mode, "compile_mode", COMPILE_MODES)
        if self.compile_mode is not None and not self.compile:
            raise ValueError(f"compile_mode={self.compile_mode!r} needs compile=True (or the modules to compile)")
        if self.backend in EXPORTED_BACKENDS:
            torch_only = [name for name in ("compile", "channels_last", "fuse_qkv") if getattr(self, name)]
            if torch_only:
                raise ValueError(f"{torch_only} apply to the PyTorch backends ('eager', 'cuda_graph'), not to "
                                 f"backend={self.backend!r}, which runs an exported program")
        object.__setattr__(self, "allow_mismatch", check_allow(self.allow_mismatch))
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))

    def resolve_backend(self, device: torch.device) -> str:
        """``"auto"`` → ``"cuda_graph"`` on a CUDA device, ``"eager"`` elsewhere."""
        if self.backend == "auto":
            return "cuda_graph" if device.type == "cuda" else "eager"
        return self.backend


#: the program's modules ``RuntimeConfig.compile`` can name, in program order
COMPILE_PARTS = ("text_encoder", "denoiser", "decoder")
#: ``torch.compile`` modes; the last two capture CUDA graphs of their own
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_parts(value: Any) -> tuple[str, ...]:
    """``RuntimeConfig.compile`` → the tuple of module names to compile (``True``: all, ``False``: none)."""
    if isinstance(value, bool):
        return COMPILE_PARTS if value else ()
    parts = (value,) if isinstance(value, str) else value
    if not isinstance(parts, (tuple, list)) or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"compile must be True, False or a tuple of {COMPILE_PARTS}, got {value!r}")
    unknown = sorted(set(parts) - set(COMPILE_PARTS))
    if unknown:
        raise ValueError(f"compile names unknown module(s) {unknown}; choose from {COMPILE_PARTS} (or True for all)")
    return tuple(p for p in COMPILE_PARTS if p in parts)
