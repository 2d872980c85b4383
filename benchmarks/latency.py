#!/usr/bin/env python3
"""End-to-end latency, first-image time and peak memory of the compiled OLSS sampler vs diffusers (random weights).

Everything is built in code (no downloads), with the real architectures and random weights (only speed is measured);
batch 1, ``output_type="pt"`` for every contender (decode included, no PIL conversion), the same initial latents.

``--model sd15`` (default): UNet2DConditionModel with SD1.5's config, the SD AutoencoderKL, a CLIP ViT-L/14 text
encoder and a small offline byte-level CLIP tokenizer; fp16, 512x512, guidance 7.5 (CFG batch 2). For n in --steps
(default 5, 10, 20):

* diffusers ``StableDiffusionPipeline`` with DPMSolverMultistep (DPM-Solver++ 2M) and with DDIM, eager;
* the OLSS runner (``compile_olss_pipeline``) with backend ``eager`` / ``cuda_graph`` / ``cuda_graph`` with the
  whole program compiled (``compile=True``: text encoder, UNet, VAE decoder);
* the floor: n x (UNet batch 2 captured alone in a CUDA graph) + text encoder (graphed) + VAE decode (graphed);
* first-image time of the compiled runner in a fresh process (``compile_olss_pipeline`` + first call), cold (empty
  inductor, Triton and olss_fast caches) and warm (empty inductor and Triton caches, the olss_fast compile cache
  written by the cold process): what a second serving process pays;
* peak GPU memory of every contender (``torch.cuda.max_memory_allocated`` during its calls, weights included).
The OLSS schedule used is DDIM's own coefficients at the trailing timesteps (the coefficients do not change speed).
Plus a kernel benchmark (``triton.testing.do_bench``, median): the fused OLSS step against the unfused torch
expression and the torch reference, µs per step averaged over the n = 10 steps, and GB/s at a large batch.

``--model sd3-medium`` / ``--model flux-dev``: SD3-medium's MMDiT (2B) with CLIP-L, CLIP-G and T5-XXL, or
FLUX.1-dev's transformer (12B, distilled guidance 3.5) with CLIP-L and T5-XXL; their 16-channel VAEs; bf16, 1024x1024.
Contenders: the diffusers pipeline at its default 28 FlowMatchEuler steps vs the OLSS runner at --steps (default 8),
eager and cuda_graph (text encoders on the host, outside the graph), the per-step floor (the transformer call
captured alone) and peak memory. The OLSS schedule is Euler's own coefficients at the pipeline's sigmas for n steps.

Timing: CUDA events around each call after warm-up, median of the repeats; every ratio is against a baseline measured
in the same run on the same card. Writes JSON (``--out``, default ``benchmarks/latency.json``) after every section,
so a run cut short still leaves its results, and prints a table at the end.

Usage::

    python benchmarks/latency.py                       # full run (GPU)
    python benchmarks/latency.py --quick --time-budget 230
    python benchmarks/latency.py --model flux-dev --quick
    python benchmarks/latency.py --tiny --allow-cpu    # smoke test of the script on a CPU (tiny modules)
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

LOG = logging.getLogger("benchmarks.latency")
T0 = time.perf_counter()

PROMPT = "a photo of an astronaut riding a horse on mars"
GUIDANCE = 7.5

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215, norm_num_groups=32,
)
CLIP_L14 = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
)
TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLOW_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    use_quant_conv=False, use_post_quant_conv=False,
)
CLIP_G14 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
TINY_T5 = dict(vocab_size=128, d_model=128, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
               is_encoder_decoder=False, use_cache=False)
TINY_SD3 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=128, caption_projection_dim=32, pooled_projection_dim=64,
                out_channels=16, pos_embed_max_size=32)
TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 4, 8))
TINY_FLOW_VAE = dict(TINY_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
#: per model: (resolution, default student steps, guidance scale of the call, diffusers' default steps)
MODELS = {"sd15": (512, [5, 10, 20], GUIDANCE, None), "sd3-medium": (1024, [8], 7.0, 28),
          "flux-dev": (1024, [8], 3.5, 28)}

SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, steps_offset=1, clip_sample=False, timestep_spacing="trailing",
    prediction_type="epsilon",
)


# ============================================================================================== construction
def build_tokenizer(folder: Path) -> Any:
    """A byte-level CLIP BPE tokenizer written to ``folder`` and loaded offline (77 tokens, as SD's)."""
    from transformers import CLIPTokenizer

    from olss_fast.testing import write_clip_tokenizer

    write_clip_tokenizer(folder, model_max_length=77, merges=["o n</w>", "t h", "th e</w>", "r i", "h o", "s e</w>"])
    return CLIPTokenizer.from_pretrained(str(folder))


def build_pipeline(device: torch.device, dtype: torch.dtype, tiny: bool, workdir: Path) -> Any:
    """A StableDiffusionPipeline with SD1.5-architecture random-weight modules, created directly on ``device``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = build_tokenizer(workdir / "tokenizer")
    clip_cfg = dict(TINY_CLIP if tiny else CLIP_L14)
    clip_cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip_cfg))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe = pipe.to(device=device, dtype=dtype)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flow_pipeline(model: str, device: torch.device, dtype: torch.dtype, tiny: bool, workdir: Path) -> Any:
    """A StableDiffusion3Pipeline (SD3-medium shapes) or FluxPipeline (FLUX.1-dev shapes) with random weights,
    created directly on ``device`` in ``dtype`` (no float32 copy of a 12B model is ever materialised)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from olss_fast.testing import tiny_t5_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(workdir / "tokenizer")
    t5_len = 256 if model == "sd3-medium" else 512
    t5_tok = tiny_t5_tokenizer(model_max_length=t5_len)

    def clip(cfg: dict, cls: Any) -> Any:
        cfg = dict(cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return cls(CLIPTextConfig(**cfg))

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            t5 = T5EncoderModel(T5Config(**(TINY_T5 if tiny else T5_XXL)))
            vae_cfg = dict(TINY_FLOW_VAE if tiny else FLOW_VAE)
            if model == "sd3-medium":
                vae = AutoencoderKL(**vae_cfg, scaling_factor=1.5305, shift_factor=0.0609)
                pipe = StableDiffusion3Pipeline(
                    transformer=SD3Transformer2DModel(**(TINY_SD3 if tiny else SD3_MEDIUM)),
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                    text_encoder=clip(TINY_CLIP if tiny else CLIP_L14, CLIPTextModelWithProjection), tokenizer=tok,
                    text_encoder_2=clip(dict(TINY_CLIP, hidden_size=64, projection_dim=32) if tiny else CLIP_G14,
                                        CLIPTextModelWithProjection), tokenizer_2=tok,
                    text_encoder_3=t5, tokenizer_3=t5_tok,
                )
            else:
                vae = AutoencoderKL(**vae_cfg, scaling_factor=0.3611, shift_factor=0.1159)
                pipe = FluxPipeline(
                    transformer=FluxTransformer2DModel(**(TINY_FLUX if tiny else FLUX_DEV)),
                    scheduler=FlowMatchEulerDiscreteScheduler(
                        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                        max_image_seq_len=4096),
                    vae=vae, text_encoder=clip(TINY_CLIP if tiny else CLIP_L14, CLIPTextModel), tokenizer=tok,
                    text_encoder_2=t5, tokenizer_2=t5_tok,
                )
    finally:
        torch.set_default_dtype(previous)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flow_euler_schedule(pipe: Any, n: int, height: int, width: int) -> Any:
    """FlowMatchEuler's own update at the sigmas the pipeline sets for n steps at this size, as an OLSSSchedule."""
    import copy

    from olss_fast.pipelines.registry import adapter_for
    from olss_fast.core.schedule import OLSSSchedule
    from olss_fast.core.step import ddim_step_factors, unroll_linear_steps

    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(**adapter_for(pipe).teacher_timestep_kwargs(sched, n, height, width), device="cpu")
    sigmas = [float(v) for v in sched.sigmas]
    coeffs = unroll_linear_steps([ddim_step_factors(sigmas[j], sigmas[j + 1], "flow") for j in range(n)])
    return OLSSSchedule(timesteps=[float(t) for t in sched.timesteps], indices=list(range(n)), coeffs=coeffs,
                        teacher_steps=n, prediction_type="flow", path="euler")


def ddim_olss_schedule(n: int) -> Any:
    """DDIM's update at its n trailing timesteps as an OLSSSchedule (speed does not depend on the coefficients)."""
    from diffusers import DDIMScheduler

    from olss_fast.core.schedule import OLSSSchedule
    from olss_fast.core.step import ddim_coefficients

    ddim = DDIMScheduler(**SCHEDULER)
    ddim.set_timesteps(n)
    ts = [int(t) for t in ddim.timesteps]
    ratio = ddim.config.num_train_timesteps // n
    coeffs = ddim_coefficients(ddim.alphas_cumprod, ts, [t - ratio for t in ts], float(ddim.final_alpha_cumprod))
    return OLSSSchedule(timesteps=ts, indices=list(range(n)), coeffs=coeffs, teacher_steps=n, path="ddim")


# ============================================================================================== timing
class Bench:
    """Timing helpers + a deadline + incremental JSON output."""

    def __init__(self, device: torch.device, out: Path, budget_s: float, quick: bool) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.out = out
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.quick = quick
        self.results: dict[str, Any] = {"sections": {}, "skipped": {}}

    def remaining(self) -> float:
        if self.budget_s <= 0:
            return float("inf")
        return self.budget_s - (time.perf_counter() - self.t0)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_call(self, fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, Any]:
        """Median/min/mean ms of ``fn`` over ``repeats`` calls after ``warmup`` calls (CUDA events on a GPU)."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "mean_ms": statistics.fmean(times),
                "repeats": repeats}

    def wall(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def record(self, section: str, key: str, value: Any) -> None:
        self.results["sections"].setdefault(section, {})[key] = value
        self.save()

    def skip(self, what: str, why: str) -> None:
        LOG.warning("skipping %s: %s", what, why)
        self.results["skipped"][what] = why
        self.save()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.out)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ============================================================================================== sections
@dataclasses.dataclass
class Setup:
    """The model under test: its pipeline, size, latents and how each contender calls it."""

    model: str
    pipe: Any
    lat: torch.Tensor
    height: int
    width: int
    guidance: float
    default_steps: Optional[int]

    @property
    def flow(self) -> bool:
        return self.model != "sd15"

    def schedule(self, n: int) -> Any:
        return flow_euler_schedule(self.pipe, n, self.height, self.width) if self.flow else ddim_olss_schedule(n)

    def call_kwargs(self) -> dict[str, Any]:
        return {"latents": self.lat, "output_type": "pt", "height": self.height, "width": self.width,
                "guidance_scale": self.guidance}


def _memory_start(b: Bench) -> int:
    if not b.cuda:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _memory(b: Bench, start: int) -> dict[str, float]:
    """Peak memory since :func:`_memory_start` (weights included) and how much of it the contender added."""
    if not b.cuda:
        return {}
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_allocated_mb": round(peak / 2**20, 1), "peak_over_weights_mb": round((peak - start) / 2**20, 1),
            "reserved_mb": round(torch.cuda.memory_reserved() / 2**20, 1)}


def bench_floor(b: Bench, st: Setup) -> None:
    """The denoiser call (CFG batch), the text encoder (when it runs inside the program) and the decoder, each
    captured alone in a CUDA graph: the program's floor is n x denoiser + text encoder + decoder."""
    from olss_fast.serve.cuda_graph import capture_cuda_graph
    from olss_fast.pipelines.base import CallOptions
    from olss_fast.pipelines.registry import adapter_for

    a = adapter_for(st.pipe)
    args = {"prompt": [PROMPT]}
    if a.cfg_argument != "guidance_scale":  # Flux: guidance_scale is the distilled embedding, CFG stays off
        args["guidance_scale"] = st.guidance
    cfg = st.guidance if a.cfg_argument == "guidance_scale" else 1.0
    guided = a.is_guided(args, cfg)
    opts = CallOptions()
    with torch.no_grad():
        prepared = a.prepare(args, guided, 1, True, st.height, st.width, opts)
        cond = a.encode(prepared.inputs, prepared.mode, guided, opts)
    x = torch.cat([st.lat, st.lat]) if guided else st.lat
    t = torch.tensor(st.schedule(10).timesteps[0], device=b.device)
    parts: dict[str, Callable[[], Any]] = {
        "denoiser": lambda: a.denoise(a.denoiser, x, t, cond, opts),
        "decoder": lambda: a.decode(st.lat, st.height, st.width),
    }
    if prepared.mode == "tokens":
        parts["text_encoder"] = lambda: a.encode(prepared.inputs, prepared.mode, guided, opts)
    reps = 10 if b.quick else 30
    with torch.no_grad():
        for name, fn in parts.items():
            try:
                eager = b.time_call(fn, warmup=2, repeats=reps)
                graph, _ = capture_cuda_graph(fn, warmup_iters=2)
                graphed = b.time_call(graph.replay, warmup=3, repeats=reps)
            except Exception as exc:  # e.g. a module that cannot be captured: keep the other parts
                LOG.exception("floor part %s failed", name)
                b.results.setdefault("errors", {})[f"floor/{name}"] = repr(exc)
                continue
            b.record("floor", name, {"eager": eager, "graphed": graphed, "batch": int(x.shape[0])})
            del graph
            _free()


def bench_diffusers(b: Bench, st: Setup, steps: list[int], name: str, scheduler_cls: Any = None) -> None:
    """The diffusers pipeline itself (SD1.5: with ``scheduler_cls``; flow models: their own FlowMatchEuler)."""
    if scheduler_cls is not None:
        st.pipe.scheduler = scheduler_cls.from_config(SCHEDULER)
    reps = 3 if b.quick else 10
    for n in steps:
        def call(n: int = n) -> Any:
            return st.pipe(PROMPT, num_inference_steps=n, **st.call_kwargs()).images

        start = _memory_start(b)
        with torch.no_grad():
            res = b.time_call(call, warmup=1, repeats=reps)
        res.update(_memory(b, start))
        b.record(f"diffusers_{name}", str(n), res)
        _free()


def bench_runner(b: Bench, st: Setup, steps: list[int], backend: str, compile: bool, label: str,
                 cache_dir: Optional[str] = None) -> None:
    from olss_fast.serve.runner import compile_olss_pipeline

    reps = (10 if b.quick else 30) if backend == "cuda_graph" else (3 if b.quick else 10)
    for n in steps:
        start = _memory_start(b)
        t = time.perf_counter()
        runner = compile_olss_pipeline(st.pipe, st.schedule(n), backend=backend, compile=compile,
                                       cache_dir=cache_dir)

        def call(runner: Any = runner) -> Any:
            return runner(PROMPT, **st.call_kwargs()).images

        call()  # capture (and compilation) happen in the first call
        b.sync()
        first_s = time.perf_counter() - t
        res = b.time_call(call, warmup=1, repeats=reps)
        res["first_call_s"] = round(first_s, 2)
        res["text_encoder_in_graph"] = bool(getattr(runner, "text_encoder_in_graph", False))
        res.update(_memory(b, start))
        if compile:
            res["compile_cache"] = {k: len(v) for k, v in runner.cache_info().get("compile_cache", {}).items()
                                    if isinstance(v, list)}
        b.record(label, str(n), res)
        del runner
        _free()


def bench_first_image(b: Bench, args: argparse.Namespace, n: int) -> str:
    """First-image time of the whole-program compiled runner in fresh processes: cold (every cache empty), then warm
    (empty inductor and Triton caches, the olss_fast compile cache the cold process wrote). Returns that cache."""
    cache = tempfile.mkdtemp(prefix="olss_compile_cache_")
    for label in ("cold", "warm"):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor_"),
                   TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="triton_"))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-first-image", cache, "--model", args.model,
               "--steps", str(n)] + (["--tiny"] if args.tiny else []) + (["--allow-cpu"] if args.allow_cpu else [])
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=max(60.0, min(b.remaining(), 1800.0)))
        if proc.returncode != 0:
            raise RuntimeError(f"the {label} first-image process failed: {proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["process_wall_s"] = round(time.perf_counter() - t, 1)
        b.record("first_image", label, res)
    return cache


def child_first_image(args: argparse.Namespace) -> int:
    """``--child-first-image CACHE``: build the pipeline, then time compile_olss_pipeline + the first image."""
    from olss_fast.serve.compile_cache import inductor_counters
    from olss_fast.serve.runner import compile_olss_pipeline

    st = make_setup(args)
    cuda = st.lat.device.type == "cuda"
    torch.cuda.synchronize() if cuda else None
    t = time.perf_counter()
    runner = compile_olss_pipeline(st.pipe, st.schedule(args.steps[0]), backend="cuda_graph" if cuda else "eager",
                                   compile=True, cache_dir=args.child_first_image)
    runner(PROMPT, **st.call_kwargs())
    torch.cuda.synchronize() if cuda else None
    first = time.perf_counter() - t
    info = runner.cache_info().get("compile_cache", {})
    print(json.dumps({"first_image_s": round(first, 2), "since_start_s": round(time.perf_counter() - T0, 1),
                      "inductor": inductor_counters(), "loaded": len(info.get("loaded", [])),
                      "saved": len(info.get("saved", []))}))
    return 0


def bench_kernel(b: Bench, n: int = 10, large_batch: int = 64) -> None:
    """Fused OLSS step vs the unfused torch expression vs the torch reference, per step j, fp16, CFG."""
    for label, batch in (("b1_sd_latent", 1), (f"b{large_batch}_sd_latent", large_batch)):
        b.record("kernel", label, _bench_kernel_size(b.device, batch, n))
        _free()


def _bench_kernel_size(dev: torch.device, batch: int, n: int) -> dict[str, Any]:
    from triton.testing import do_bench

    from olss_fast.kernels.fused_step import olss_step_reference, olss_step_triton, unfused_olss_step

    shape = (batch, 4, 64, 64)
    numel = batch * 4 * 64 * 64
    gen = torch.Generator(device=dev).manual_seed(0)
    mo = torch.randn((2 * batch, *shape[1:]), device=dev, generator=gen).half()
    x0 = torch.randn(shape, device=dev, generator=gen)
    hist = torch.randn((n, *shape), device=dev, generator=gen)
    hist_list = list(hist.unbind(0))
    out = torch.empty((2 * batch, *shape[1:]), device=dev, dtype=torch.float16)
    coeffs = (torch.randn(n, n + 1, device=dev, generator=gen) * 0.3).tril(1)
    impls: dict[str, Callable[[int], Any]] = {
        "fused_triton": lambda j: olss_step_triton(mo, coeffs, j, x0, hist, out, GUIDANCE),
        "torch_reference": lambda j: olss_step_reference(mo, coeffs, j, x0, hist, out, GUIDANCE),
        "unfused_torch": lambda j: unfused_olss_step(mo, coeffs, j, x0, hist_list[:j], GUIDANCE),
    }
    per: dict[str, list[float]] = {k: [] for k in impls}
    bytes_total = 0
    for j in range(n):
        for name, impl in impls.items():
            per[name].append(do_bench(lambda impl=impl, j=j: impl(j), warmup=10, rep=40, return_mode="median"))
        # read 2N fp16 + x0 + j history slots, write slot j + 2N fp16
        bytes_total += numel * (2 * 2 + 4 + 4 * j + 4 + 2 * 2)
    res: dict[str, Any] = {
        k: {"us_per_step_mean": 1e3 * statistics.fmean(v), "us_by_step": [round(1e3 * t, 2) for t in v]}
        for k, v in per.items()
    }
    res["fused_triton"]["GB_per_s"] = bytes_total / (1e-3 * sum(per["fused_triton"])) / 1e9
    res["elements_per_half"] = numel
    return res


# ============================================================================================== report
def table(results: dict[str, Any], steps: list[int]) -> str:
    s = results["sections"]

    def ms(section: str, n: Any) -> Optional[float]:
        v = s.get(section, {}).get(str(n))
        return None if v is None else v["median_ms"]

    floor = s.get("floor", {})

    def floor_ms(n: int) -> Optional[float]:
        try:
            total = n * floor["denoiser"]["graphed"]["median_ms"] + floor["decoder"]["graphed"]["median_ms"]
        except KeyError:
            return None
        return total + (floor["text_encoder"]["graphed"]["median_ms"] if "text_encoder" in floor else 0.0)

    flow = results.get("model", "sd15") != "sd15"
    default_n = results.get("diffusers_default_steps")
    if flow:
        cols = [("OLSS eager", "olss_eager"), ("OLSS graph", "olss_cuda_graph"),
                ("OLSS graph+compile", "olss_cuda_graph_compile")]
        base_label, base = f"diffusers {default_n} steps", ms("diffusers_default", default_n)
    else:
        cols = [("diffusers DPM++", "diffusers_dpmsolver"), ("diffusers DDIM", "diffusers_ddim"),
                ("OLSS eager", "olss_eager"), ("OLSS graph", "olss_cuda_graph"),
                ("OLSS graph+compile", "olss_cuda_graph_compile")]
        base_label, base = "diffusers DDIM, same n", None
    head = f"{'n':>3} | " + " | ".join(f"{c:>18}" for c, _ in cols) + f" | {'floor':>8} | {'best OLSS vs':>13}"
    lines = [f"latency, ms (median) — {results.get('device', '?')}, {results.get('config', '')}", head,
             "-" * len(head)]
    for n in steps:
        vals = [ms(sec, n) for _, sec in cols]
        fl = floor_ms(n)
        ref = base if flow else ms("diffusers_ddim", n)
        best = min([v for v in (ms("olss_cuda_graph", n), ms("olss_cuda_graph_compile", n), ms("olss_eager", n))
                    if v is not None], default=None)
        ratio = f"{ref / best:.2f}x" if (ref and best) else "-"
        cells = " | ".join(f"{v:>18.1f}" if v is not None else f"{'-':>18}" for v in vals)
        fl_cell = f"{fl:>8.1f}" if fl is not None else f"{'-':>8}"
        lines.append(f"{n:>3} | {cells} | {fl_cell} | {ratio:>13}")
    lines.append(f"best OLSS vs: {base_label}" + (f" = {base:.1f} ms" if base else ""))
    if floor:
        lines.append("floor parts (graphed / eager ms): " + ", ".join(
            f"{k} (batch {v['batch']}) {v['graphed']['median_ms']:.2f} / {v['eager']['median_ms']:.2f}"
            for k, v in floor.items()))
    for label, sec in (("capture", "olss_cuda_graph"), ("compile+capture", "olss_cuda_graph_compile")):
        firsts = {n: v.get("first_call_s") for n, v in s.get(sec, {}).items()}
        if firsts:
            lines.append(f"first call in-process ({label}) s: " + ", ".join(f"n={n}: {t}" for n, t in firsts.items()))
    fi = s.get("first_image", {})
    if fi:
        lines.append("first image in a fresh process, compiled (compile_olss_pipeline + first call): " + ", ".join(
            f"{k} {v['first_image_s']} s (inductor {v['inductor']}, entries loaded {v['loaded']})"
            for k, v in fi.items()))
    mem = []
    for sec, entries in s.items():
        for n, v in entries.items() if isinstance(entries, dict) else ():
            if isinstance(v, dict) and "peak_allocated_mb" in v:
                mem.append(f"{sec}[{n}] {v['peak_allocated_mb']:.0f} (+{v['peak_over_weights_mb']:.0f})")
    if mem:
        lines.append("peak GPU memory MB (+ over the weights): " + ", ".join(mem))
    for label, v in s.get("kernel", {}).items():
        lines.append(
            f"fused step {label}: triton {v['fused_triton']['us_per_step_mean']:.1f} us "
            f"({v['fused_triton']['GB_per_s']:.0f} GB/s), torch reference "
            f"{v['torch_reference']['us_per_step_mean']:.1f} us, unfused torch "
            f"{v['unfused_torch']['us_per_step_mean']:.1f} us (mean over steps)"
        )
    te = [v.get("text_encoder_in_graph") for v in s.get("olss_cuda_graph", {}).values()]
    if te and not all(te) and not flow:
        lines.append("WARNING: the text encoder could not be captured and ran outside the graph")
    for what, why in results.get("skipped", {}).items():
        lines.append(f"skipped {what}: {why}")
    return "\n".join(lines)


# ============================================================================================== main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=None, help="JSON output path (default benchmarks/latency.json)")
    p.add_argument("--out", dest="out_opt", default=None, help="same as the positional argument")
    p.add_argument("--model", choices=sorted(MODELS), default="sd15", help="architecture to time (default sd15)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="student step counts (default 5 10 20 for sd15, 8 for the flow models)")
    p.add_argument("--compile-steps", type=int, nargs="+", default=None,
                   help="step counts of the whole-program compiled contender (default: --steps)")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--skip-compile", action="store_true", help="skip the compiled contender and first-image times")
    p.add_argument("--skip-diffusers", action="store_true", help="skip the diffusers baselines")
    p.add_argument("--skip-kernel", action="store_true", help="skip the fused-step kernel benchmark")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; later sections are skipped when they would not fit (0 = unlimited)")
    p.add_argument("--compile-min-s", type=float, default=120.0,
                   help="run the compiled sections only when at least this much of the time budget is left")
    p.add_argument("--tiny", action="store_true", help="tiny random modules (smoke test)")
    p.add_argument("--allow-cpu", action="store_true", help="run what can run without CUDA (with --tiny)")
    p.add_argument("--compile-on-cpu", action="store_true",
                   help="with --allow-cpu: also run the compiled sections (inductor C++ builds: minutes)")
    p.add_argument("--table-out", default=None, help="also write the printed table to this file")
    p.add_argument("--child-first-image", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size, default_steps, _, _ = MODELS[args.model]
    args.steps = args.steps or list(default_steps)
    args.compile_steps = args.compile_steps or list(args.steps)
    for v in args.steps + args.compile_steps:
        if v < 1:
            p.error(f"step counts must be positive, got {v}")
    return args


def make_setup(args: argparse.Namespace) -> Setup:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size, _, guidance, default_n = MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "sd15":
            pipe = build_pipeline(device, torch.float16 if cuda else torch.float32, args.tiny, Path(tmp))
        else:
            pipe = build_flow_pipeline(args.model, device, torch.bfloat16 if cuda else torch.float32, args.tiny,
                                       Path(tmp))
    from olss_fast.pipelines.registry import adapter_for

    if args.tiny:
        size = 32
    a = adapter_for(pipe)
    lat = torch.randn(a.latent_shape(1, size, size), generator=torch.Generator().manual_seed(0)).to(device, a.dtype)
    return Setup(args.model, pipe, lat, size, size, guidance, default_n)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: the latency benchmark needs a GPU (use --tiny --allow-cpu for a smoke test)")
        return 0
    if args.child_first_image:
        return child_first_image(args)
    out = Path(args.out or args.out_opt or Path(__file__).resolve().parent / "latency.json")
    device = torch.device("cuda" if cuda else "cpu")
    b = Bench(device, out, args.time_budget, args.quick)
    size, _, guidance, default_n = MODELS[args.model]
    b.results.update({
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu", "model": args.model,
        "torch": torch.__version__, "python": platform.python_version(),
        "config": ("tiny" if args.tiny else {"sd15": "SD1.5 architecture, random weights, fp16, 512x512",
                                             "sd3-medium": "SD3-medium architecture, random weights, bf16, 1024x1024",
                                             "flux-dev": "FLUX.1-dev architecture, random weights, bf16, 1024x1024"}
                   [args.model]),
        "batch": 1, "guidance_scale": guidance, "output_type": "pt", "steps": args.steps, "quick": args.quick,
        "diffusers_default_steps": default_n,
        "olss_schedule": "Euler coefficients at the pipeline's sigmas" if args.model != "sd15"
        else "DDIM coefficients at trailing timesteps",
    })
    try:
        import diffusers
        import transformers

        b.results.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
        import triton

        b.results["triton"] = triton.__version__
    except ImportError as exc:
        b.results["import_note"] = repr(exc)
    b.save()

    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    t = time.perf_counter()
    st = make_setup(args)
    b.results["build_s"] = round(time.perf_counter() - t, 1)
    LOG.info("built the %s pipeline in %.1f s", args.model, b.results["build_s"])

    compile_ok = not args.skip_compile and (cuda or args.compile_on_cpu)
    state: dict[str, Any] = {}
    sections: list[tuple[str, float, Callable[[], None]]] = []
    if cuda:
        sections.append(("floor", 10, lambda: bench_floor(b, st)))
        sections.append(("olss_cuda_graph", 15,
                         lambda: bench_runner(b, st, args.steps, "cuda_graph", False, "olss_cuda_graph")))
    sections.append(("olss_eager", 10, lambda: bench_runner(b, st, args.steps, "eager", False, "olss_eager")))
    if not args.skip_diffusers:
        if st.flow:
            sections.append(("diffusers_default", 20,
                             lambda: bench_diffusers(b, st, [default_n], "default")))
        else:
            sections.append(("diffusers_ddim", 10,
                             lambda: bench_diffusers(b, st, args.steps, "ddim", DDIMScheduler)))
            sections.append(("diffusers_dpmsolver", 12,
                             lambda: bench_diffusers(b, st, args.steps, "dpmsolver", DPMSolverMultistepScheduler)))
    if cuda and not args.skip_kernel and not st.flow:
        sections.append(("kernel", 15, lambda: bench_kernel(b)))
    if compile_ok:
        def first_image() -> None:
            state["cache"] = bench_first_image(b, args, args.compile_steps[0])

        sections.append(("first_image", args.compile_min_s, first_image))
        sections.append(("olss_cuda_graph_compile", args.compile_min_s / 2,
                         lambda: bench_runner(b, st, args.compile_steps, "cuda_graph" if cuda else "eager", True,
                                              "olss_cuda_graph_compile", cache_dir=state.get("cache"))))
    else:
        b.skip("olss_cuda_graph_compile", "--skip-compile" if args.skip_compile else "no CUDA (--compile-on-cpu)")

    for name, need_s, run in sections:
        if b.remaining() < need_s:
            b.skip(name, f"time budget: {b.remaining():.0f} s left, needs about {need_s:.0f} s")
            continue
        LOG.info("section %s (%.0f s left)", name, b.remaining())
        t = time.perf_counter()
        try:
            run()
        except Exception as exc:  # keep going: one failing contender must not lose the others' numbers
            LOG.exception("section %s failed", name)
            b.results.setdefault("errors", {})[name] = repr(exc)
        b.results.setdefault("section_s", {})[name] = round(time.perf_counter() - t, 1)
        b.save()
        _free()

    text = table(b.results, args.steps)
    if args.table_out:
        Path(args.table_out).write_text(text + "\n")
    print(text)
    return 1 if b.results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
