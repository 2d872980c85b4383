"""The program in PyTorch: the ``"eager"`` and ``"cuda_graph"`` backends (optionally ``torch.compile``-d)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from olss_fast.core.checks import warn_once
from olss_fast.core.files import default_cache_dir
from olss_fast.core.fingerprint import model_id
from olss_fast.pipelines.base import CallOptions
from olss_fast.serve.backend import BackendSetup, CaptureFailed, ProgramBackend, ProgramRequest, register_backend
from olss_fast.serve.compile_cache import CompileCache, cache_key, environment, inductor_counters
from olss_fast.serve.cuda_graph import CapturedGraph, GraphCache, StaticBuffers, tensor_signature
from olss_fast.serve.program import ProgramBuffers, allocate_buffers, run_loop

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    """One program instance: its static inputs, work buffers and (cuda_graph) the captured graph."""

    key: tuple
    mode: str
    guided: bool
    decode: bool
    options: CallOptions
    height: int
    width: int
    inputs: StaticBuffers
    buffers: ProgramBuffers
    graph: Optional[CapturedGraph] = None
    runs: int = 0
    on_step: Optional[Callable[[int, torch.Tensor], None]] = None


class TorchBackend(ProgramBackend):
    """The program in PyTorch: eager (``setup.backend == "eager"``) or captured in one CUDA graph per input
    signature (``"cuda_graph"``). Program instances (buffers, graphs) live in an LRU cache of ``cache_size``; the
    graphs share one memory pool (safe: they replay one at a time, their outputs are copied out right after each
    replay, and every tensor that outlives a replay — static inputs, work buffers — is allocated outside the pool).

    With ``RuntimeConfig.compile`` the named modules run ``torch.compile``-d (static shapes), inside the captured graph
    with ``cuda_graph``; with ``compile_cache`` their artefacts are loaded from and saved to disk
    (:mod:`olss_fast.serve.compile_cache`). ``channels_last`` / ``fuse_qkv`` are applied to the pipeline's modules here,
    again whenever the runner notices new modules.
    """

    def __init__(self, setup: BackendSetup) -> None:
        super().__init__(setup)
        cfg = setup.config
        self.cache: GraphCache[_Entry] = GraphCache(cfg.cache_size)
        self.num_captures = 0
        self.num_builds = 0
        self._compiled: dict[str, Any] = {}
        self._pool: Any = None
        self._announced: set[tuple] = set()
        self._warned_host_text = False
        self.compile_cache: Optional[CompileCache] = None
        if cfg.compile and cfg.compile_cache:
            root = Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_dir()
            self.compile_cache = CompileCache(root / "compile")
        self.prepare_modules()

    @property
    def capturing(self) -> bool:
        return self.setup.backend == "cuda_graph"

    def prepare_modules(self) -> None:
        """Apply ``channels_last`` / ``fuse_qkv`` to the pipeline's current modules (in place)."""
        r, cfg = self.setup, self.setup.config
        modules = {k: m for k, m in r.adapter.modules().items() if m is not None}
        if cfg.channels_last:
            for m in modules.values():
                m.to(memory_format=torch.channels_last)
        if cfg.fuse_qkv:
            fusable = {k: m for k, m in modules.items() if hasattr(m, "fuse_qkv_projections")}
            if not fusable:
                warn_once(("fuse_qkv", r.adapter.name),
                          "fuse_qkv: no module of this %s offers fuse_qkv_projections; attention stays unfused",
                          r.adapter.name, logger=logger)
            for name, m in fusable.items():
                if _has_lora_layers(m):
                    raise ValueError(
                        f"fuse_qkv cannot fuse the {name}'s attention: it has LoRA adapter layers, which the fused "
                        "projection would silently leave out; fuse the LoRA into the weights and unload it first "
                        "(pipe.fuse_lora(); pipe.unload_lora_weights()) or set fuse_qkv=False"
                    )
                try:
                    m.fuse_qkv_projections()
                except ValueError as exc:  # e.g. diffusers refuses models with added KV projections
                    raise ValueError(f"fuse_qkv: the {name} cannot be fused ({exc}); set fuse_qkv=False") from None

    def invalidate(self) -> None:
        """The pipeline's modules changed: drop every captured program and compiled wrapper, prepare the new
        modules."""
        self.cache.clear()
        self._compiled.clear()
        self._pool = None
        self.prepare_modules()

    def _maybe_compiled(self, part: str, fn: Any) -> Any:
        """``fn`` itself, or its ``torch.compile``-d wrapper when ``RuntimeConfig.compile`` names ``part``."""
        cfg = self.setup.config
        if part not in cfg.compile:
            return fn
        compiled = self._compiled.get(part)
        if compiled is None:
            compiled = self._compiled[part] = torch.compile(fn, mode=cfg.compile_mode, dynamic=False)
        return compiled

    def denoiser(self) -> Any:
        return self._maybe_compiled("denoiser", self.setup.adapter.denoiser)

    def _key(self, req: ProgramRequest) -> tuple:
        return (self.setup.backend, req.mode, req.guided, req.decode, str(self.setup.dtype), req.options,
                req.height, req.width, tensor_signature(req.inputs))

    def _program(self, entry: _Entry) -> torch.Tensor:
        """The static program: [text encoder] → run_loop → [decode]. Capturable."""
        r = self.setup
        adapter = r.adapter
        with torch.no_grad():
            encode = self._maybe_compiled("text_encoder", adapter.encode) if entry.mode == "tokens" else adapter.encode
            cond = encode(dict(entry.inputs.items()), entry.mode, entry.guided, entry.options)
            denoiser = self.denoiser()
            timesteps = r.state.timesteps

            def step(j: int, x: torch.Tensor) -> torch.Tensor:
                return adapter.denoise(denoiser, x, timesteps[j], cond, entry.options)

            final = run_loop(step, entry.inputs["latents"], entry.buffers, r.state.coeffs,
                             r.state.guidance if entry.guided else None, step_backend=r.config.step_backend,
                             guidance_rescale=entry.options.guidance_rescale, on_step=entry.on_step)
            if not entry.decode:
                return final
            return self._maybe_compiled("decoder", adapter.decode)(final, entry.height, entry.width)

    def _graph_pool(self) -> Any:
        if self._pool is None and torch.cuda.is_available():
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _compile_description(self, req: ProgramRequest) -> dict[str, Any]:
        """What the compiled code of a program depends on (:func:`olss_fast.serve.compile_cache.cache_key`)."""
        r, cfg = self.setup, self.setup.config
        return {
            "pipeline": r.adapter.name, "backend": r.backend, "dtype": str(r.dtype),
            "program": {"mode": req.mode, "guided": req.guided, "decode": req.decode, "height": req.height,
                        "width": req.width, "options": dataclasses.asdict(req.options),
                        "inputs": [[name, list(shape), dtype] for name, shape, dtype, _ in
                                   tensor_signature(req.inputs)]},
            "compile": list(cfg.compile), "compile_mode": cfg.compile_mode, "channels_last": cfg.channels_last,
            "fuse_qkv": cfg.fuse_qkv,
            "modules": {name: model_id(m) for name, m in sorted(r.adapter.modules().items())
                        if m is not None},
            **environment(r.device),
        }

    def _announce(self, key: tuple, req: ProgramRequest) -> None:
        """Log once per new input signature that this call builds (compiles / captures) a program."""
        r = self.setup
        if key in self._announced or not (self.capturing or r.config.compile):
            return
        self._announced.add(key)
        what = " and ".join(w for w, on in (("compiles", bool(r.config.compile)), ("captures", self.capturing)) if on)
        lat = list(req.inputs["latents"].shape)
        if req.warmup:
            logger.info("warm-up: %s the %d-step program for latents %s (%s, %s mode, %dx%d)", what,
                        r.state.num_steps, lat, r.dtype, req.mode, req.height, req.width)
        else:
            logger.warning(
                "this call %s the %d-step program for a new input (latents %s, %s mode, %dx%d, %s): it is slow "
                "once; build it ahead with compile_olss_pipeline(..., warmup=[(batch, height, width), ...])",
                what, r.state.num_steps, lat, req.mode, req.height, req.width,
                "decoded" if req.decode else "latent output",
            )

    def run(self, req: ProgramRequest) -> torch.Tensor:
        r = self.setup
        key = self._key(req)
        entry = self.cache.get(key)
        pending: Optional[tuple[str, dict[str, Any], dict[str, int]]] = None
        if entry is None:
            self._announce(key, req)
            if "text_encoder" in r.config.compile and req.mode != "tokens" and not self._warned_host_text:
                self._warned_host_text = True
                logger.warning("compile: the text encoder of this %s runs on the host for these calls (embeddings "
                               "given, or the family encodes outside the program) and is not compiled",
                               r.adapter.name)
            if self.compile_cache is not None:
                desc = self._compile_description(req)
                ck = cache_key(desc)
                if ck not in self.compile_cache.loaded and ck not in self.compile_cache.saved:
                    self.compile_cache.load(ck, desc)
                pending = (ck, desc, inductor_counters())
            lat = req.inputs["latents"]
            entry = _Entry(key=key, mode=req.mode, guided=req.guided, decode=req.decode, options=req.options,
                           height=req.height, width=req.width, inputs=StaticBuffers(req.inputs),
                           buffers=allocate_buffers(tuple(lat.shape), r.state.num_steps, r.dtype, req.guided,
                                                    r.device))
            if self.capturing:
                if req.on_step is not None:
                    raise ValueError("callback_on_step_end runs Python between steps, which a CUDA graph replay "
                                     "cannot; use backend='eager' for callbacks")
                entry.inputs.load(req.inputs)
                logger.info("capturing the %d-step OLSS loop in a CUDA graph for latents %s (%s, %s mode)",
                            r.state.num_steps, list(lat.shape), r.dtype, req.mode)
                try:
                    entry.graph = CapturedGraph(key, lambda e=entry: self._program(e), entry.inputs, state=entry,
                                                warmup_iters=r.config.warmup_iters, device=r.device,
                                                pool=self._graph_pool())
                except Exception as exc:  # noqa: BLE001 - re-raised with context by the front end
                    raise CaptureFailed(req.mode, exc) from exc
                self.num_captures += 1
            self.num_builds += 1
            self.cache.put(key, entry)
        entry.runs += 1
        if entry.graph is not None:
            out = entry.graph.replay(req.inputs).clone()
        else:
            entry.inputs.load(req.inputs)
            entry.on_step = req.on_step
            try:
                out = self._program(entry).clone()
            finally:
                entry.on_step = None
        if pending is not None:
            self._save_compiled(*pending)
        return out

    def _save_compiled(self, ck: str, desc: dict[str, Any], before: dict[str, int]) -> None:
        """Persist what the first run of a program compiled, unless its entry was loaded and nothing new was
        compiled since."""
        assert self.compile_cache is not None
        after = inductor_counters()
        compiled_new = after.get("fxgraph_cache_miss", 1) > before.get("fxgraph_cache_miss", 0)
        if (ck in self.compile_cache.loaded or ck in self.compile_cache.saved) and not compiled_new:
            return
        self.compile_cache.save(ck, desc)

    def cache_info(self) -> dict[str, Any]:
        c = self.cache
        info = {"entries": c.keys(), "size": len(c), "max_size": c.max_size, "hits": c.hits,
                "misses": c.misses, "evictions": c.evictions, "captures": self.num_captures, "builds": self.num_builds}
        if self.compile_cache is not None:
            info["compile_cache"] = {"folder": str(self.compile_cache.folder),
                                     "loaded": sorted(self.compile_cache.loaded),
                                     "saved": sorted(self.compile_cache.saved)}
        return info


def _has_lora_layers(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


register_backend("eager", TorchBackend)
register_backend("cuda_graph", TorchBackend)
