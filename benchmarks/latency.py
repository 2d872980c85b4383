#!/usr/bin/env python3
"""End-to-end latency of the compiled OLSS sampler vs diffusers, on an SD1.5-architecture pipeline (random weights).

Everything is built in code (no downloads): UNet2DConditionModel with SD1.5's config, the SD AutoencoderKL, a CLIP
ViT-L/14 text encoder and a small offline byte-level CLIP tokenizer (token ids only have to be valid ids; the
weights are random, so only speed is measured). fp16, 512x512, guidance 7.5 (CFG batch 2), batch 1,
``output_type="pt"`` for every contender (decode included, no PIL conversion), the same initial latents.

For n in --steps (default 5, 10, 20):
* diffusers ``StableDiffusionPipeline`` with DPMSolverMultistep (DPM-Solver++ 2M) and with DDIM, eager;
* the OLSS runner (``compile_olss_pipeline``) with backend ``eager`` / ``cuda_graph`` / ``cuda_graph`` +
  ``compile_unet`` (torch.compile is compiled ONCE, for n = --compile-steps, default 10: it takes about a minute);
* the floor: n x (UNet batch 2 captured alone in a CUDA graph) + text encoder (graphed) + VAE decode (graphed).
The OLSS schedule used is DDIM's own coefficients at the trailing timesteps (the coefficients do not change speed).

Plus a kernel benchmark (``triton.testing.do_bench``, median): the fused OLSS step against the unfused torch
expression and the torch reference, µs per step averaged over the n = 10 steps, and GB/s at a large batch.

Timing: CUDA events around each call after warm-up, median of the repeats; every ratio is against a baseline measured
in the same run on the same card. Writes JSON (``--out``, default ``benchmarks/latency.json``) after every section,
so a run cut short still leaves its results, and prints a table at the end.

Usage::

    python benchmarks/latency.py                       # full run (GPU)
    python benchmarks/latency.py --quick --time-budget 230
    python benchmarks/latency.py --skip-compile
    python benchmarks/latency.py --tiny --allow-cpu    # smoke test of the script on a CPU (tiny modules)
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

LOG = logging.getLogger("benchmarks.latency")

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


def ddim_olss_schedule(n: int) -> Any:
    """DDIM's update at its n trailing timesteps as an OLSSSchedule (speed does not depend on the coefficients)."""
    from diffusers import DDIMScheduler

    from olss_fast.schedule import OLSSSchedule
    from olss_fast.step import ddim_coefficients

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
def bench_floor(b: Bench, pipe: Any, lat: torch.Tensor) -> None:
    """UNet (batch 2), text encoder (batch 2) and VAE decode (batch 1), each captured alone in a CUDA graph."""
    from olss_fast.cuda_graph import capture_cuda_graph

    dev, dtype = b.device, pipe.unet.dtype
    x = torch.cat([lat, lat])
    t = torch.tensor(999, device=dev)
    ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(dev)
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0].to(dtype)
    sf = pipe.vae.config.scaling_factor
    parts: dict[str, Callable[[], Any]] = {
        "unet_b2": lambda: pipe.unet(x, t, encoder_hidden_states=emb, return_dict=False)[0],
        "text_encoder_b2": lambda: pipe.text_encoder(ids)[0],
        "vae_decode_b1": lambda: pipe.vae.decode(lat / sf, return_dict=False)[0],
    }
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
            b.record("floor", name, {"eager": eager, "graphed": graphed})
            del graph
            _free()


def bench_diffusers(b: Bench, pipe: Any, lat: torch.Tensor, steps: list[int], name: str, scheduler_cls: Any) -> None:
    pipe.scheduler = scheduler_cls.from_config(SCHEDULER)
    reps = 3 if b.quick else 10
    for n in steps:
        def call(n: int = n) -> Any:
            return pipe(PROMPT, num_inference_steps=n, guidance_scale=GUIDANCE, latents=lat, output_type="pt").images

        with torch.no_grad():
            b.record(f"diffusers_{name}", str(n), b.time_call(call, warmup=1, repeats=reps))


def bench_runner(b: Bench, pipe: Any, lat: torch.Tensor, steps: list[int], backend: str, compile_unet: bool,
                 label: str) -> None:
    from olss_fast.runtime import compile_olss_pipeline

    reps = (10 if b.quick else 30) if backend == "cuda_graph" else (3 if b.quick else 10)
    for n in steps:
        runner = compile_olss_pipeline(pipe, ddim_olss_schedule(n), backend=backend, guidance_scale=GUIDANCE,
                                       compile_unet=compile_unet)

        def call(runner: Any = runner) -> Any:
            return runner(PROMPT, latents=lat, output_type="pt").images

        first_s = b.wall(call)  # capture (and torch.compile) happen in the first call
        res = b.time_call(call, warmup=1, repeats=reps)
        res["first_call_s"] = round(first_s, 2)
        res["text_encoder_in_graph"] = bool(getattr(runner, "text_encoder_in_graph", False))
        b.record(label, str(n), res)
        del runner
        _free()


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

    def ms(section: str, n: int) -> Optional[float]:
        v = s.get(section, {}).get(str(n))
        return None if v is None else v["median_ms"]

    floor = s.get("floor", {})

    def floor_ms(n: int) -> Optional[float]:
        try:
            return (n * floor["unet_b2"]["graphed"]["median_ms"] + floor["text_encoder_b2"]["graphed"]["median_ms"]
                    + floor["vae_decode_b1"]["graphed"]["median_ms"])
        except KeyError:
            return None

    cols = [("diffusers DPM++", "diffusers_dpmsolver"), ("diffusers DDIM", "diffusers_ddim"),
            ("OLSS eager", "olss_eager"), ("OLSS graph", "olss_cuda_graph"),
            ("OLSS graph+compile", "olss_cuda_graph_compile")]
    head = f"{'n':>3} | " + " | ".join(f"{c:>18}" for c, _ in cols) + f" | {'floor':>8} | {'graph vs DDIM':>13}"
    lines = [f"latency, ms (median) — {results.get('device', '?')}", head, "-" * len(head)]
    for n in steps:
        vals = [ms(sec, n) for _, sec in cols]
        fl = floor_ms(n)
        ddim, graph = ms("diffusers_ddim", n), ms("olss_cuda_graph", n)
        best = min([v for v in (graph, ms("olss_cuda_graph_compile", n)) if v is not None], default=None)
        ratio = f"{ddim / best:.2f}x" if (ddim and best) else "-"
        cells = " | ".join(f"{v:>18.1f}" if v is not None else f"{'-':>18}" for v in vals)
        fl_cell = f"{fl:>8.1f}" if fl is not None else f"{'-':>8}"
        lines.append(f"{n:>3} | {cells} | {fl_cell} | {ratio:>13}")
    if floor:
        lines.append("floor parts (graphed / eager ms): " + ", ".join(
            f"{k} {v['graphed']['median_ms']:.2f} / {v['eager']['median_ms']:.2f}" for k, v in floor.items()))
    for label, sec in (("capture", "olss_cuda_graph"), ("compile+capture", "olss_cuda_graph_compile")):
        firsts = {n: v.get("first_call_s") for n, v in s.get(sec, {}).items()}
        if firsts:
            lines.append(f"first call ({label}) s: " + ", ".join(f"n={n}: {t}" for n, t in firsts.items()))
    for label, v in s.get("kernel", {}).items():
        lines.append(
            f"fused step {label}: triton {v['fused_triton']['us_per_step_mean']:.1f} us "
            f"({v['fused_triton']['GB_per_s']:.0f} GB/s), torch reference "
            f"{v['torch_reference']['us_per_step_mean']:.1f} us, unfused torch "
            f"{v['unfused_torch']['us_per_step_mean']:.1f} us (mean over steps)"
        )
    te = [v.get("text_encoder_in_graph") for v in s.get("olss_cuda_graph", {}).values()]
    if te and not all(te):
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
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--compile-steps", type=int, default=10, help="the one n for which the UNet is torch.compile-d")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--skip-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--skip-diffusers", action="store_true", help="skip the diffusers baselines")
    p.add_argument("--skip-kernel", action="store_true", help="skip the fused-step kernel benchmark")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; later sections are skipped when they would not fit (0 = unlimited)")
    p.add_argument("--compile-min-s", type=float, default=120.0,
                   help="run torch.compile only when at least this much of the time budget is left")
    p.add_argument("--tiny", action="store_true", help="tiny random modules (smoke test)")
    p.add_argument("--allow-cpu", action="store_true", help="run what can run without CUDA (with --tiny)")
    p.add_argument("--table-out", default=None, help="also write the printed table to this file")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    out = Path(args.out or args.out_opt or Path(__file__).resolve().parent / "latency.json")
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: the latency benchmark needs a GPU (use --tiny --allow-cpu for a smoke test)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    b = Bench(device, out, args.time_budget, args.quick)
    b.results.update({
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "dtype": str(dtype),
        "config": "tiny" if args.tiny else "SD1.5 architecture, random weights, 512x512",
        "batch": 1, "guidance_scale": GUIDANCE, "output_type": "pt", "steps": args.steps, "quick": args.quick,
        "olss_schedule": "DDIM coefficients at trailing timesteps",
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
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(device, dtype, args.tiny, Path(tmp))
    b.results["build_s"] = round(time.perf_counter() - t, 1)
    size = pipe.unet.config.sample_size
    lat = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    LOG.info("built the pipeline in %.1f s", b.results["build_s"])

    sections: list[tuple[str, float, Callable[[], None]]] = []
    if cuda:
        sections.append(("floor", 10, lambda: bench_floor(b, pipe, lat)))
        sections.append(("olss_cuda_graph", 15,
                         lambda: bench_runner(b, pipe, lat, args.steps, "cuda_graph", False, "olss_cuda_graph")))
    sections.append(("olss_eager", 10, lambda: bench_runner(b, pipe, lat, args.steps, "eager", False, "olss_eager")))
    if not args.skip_diffusers:
        sections.append(("diffusers_ddim", 10,
                         lambda: bench_diffusers(b, pipe, lat, args.steps, "ddim", DDIMScheduler)))
        sections.append(("diffusers_dpmsolver", 12,
                         lambda: bench_diffusers(b, pipe, lat, args.steps, "dpmsolver", DPMSolverMultistepScheduler)))
    if cuda and not args.skip_kernel:
        sections.append(("kernel", 15, lambda: bench_kernel(b)))
    if cuda and not args.skip_compile:
        sections.append(("olss_cuda_graph_compile", args.compile_min_s,
                         lambda: bench_runner(b, pipe, lat, [args.compile_steps], "cuda_graph", True,
                                              "olss_cuda_graph_compile")))
    elif args.skip_compile:
        b.skip("olss_cuda_graph_compile", "--skip-compile")

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
