"""Worker for tests/test_compile.py: one process that runs the tiny SD pipeline through a whole-program compiled OLSS
runner and prints what happened as one JSON line.

``python compile_worker.py CACHE_DIR`` (run with a fresh ``TORCHINDUCTOR_CACHE_DIR``, so that inductor's own local
cache starts empty and only olss_fast's persistent cache in CACHE_DIR can make it hit): compiles the text encoder,
UNet and VAE decoder (eager backend, CPU), samples two prompts, and reports the largest difference from the
uncompiled runner, inductor's FX-graph cache hit/miss counts and which compile-cache entries were loaded / saved.
"""
import json
import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from olss_fast.serve.compile_cache import inductor_counters
    from olss_fast.serve.runner import compile_olss_pipeline
    from olss_fast.serve.scheduler import OLSSScheduler
    from olss_fast.testing import tiny_sd_pipeline
    from helpers import perturbed

    pipe = tiny_sd_pipeline(seed=0)
    sched = perturbed(OLSSScheduler.from_config(pipe.scheduler.config).ddim_schedule(3), seed=1)
    lat = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]
    eager = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=5.0)
    ref = eager(prompts, latents=lat, output_type="pt").images
    ref2 = eager(prompts[::-1], latents=lat.flip(0), output_type="pt").images
    runner = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=5.0, compile=True,
                                   cache_dir=sys.argv[1])
    out = runner(prompts, latents=lat, output_type="pt").images
    out2 = runner(prompts[::-1], latents=lat.flip(0), output_type="pt").images
    info = runner.cache_info()
    print(json.dumps({
        "max_diff": max((out - ref).abs().max().item(), (out2 - ref2).abs().max().item()),
        "scale": ref.abs().max().item(), "differs_between_prompts": (ref - ref2).abs().max().item(),
        "counters": inductor_counters(), "loaded": info["compile_cache"]["loaded"],
        "saved": info["compile_cache"]["saved"], "builds": info["builds"],
    }))


if __name__ == "__main__":
    main()
