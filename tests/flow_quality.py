"""Held-out quality check shared by tests/test_sd3.py and tests/test_flux.py.

OLSS (search + re-fit) on training prompts and seeds with a 28-step teacher (the pipeline's own
FlowMatchEulerDiscreteScheduler, diffusers' default step count for SD3 and Flux); then, on held-out prompts and held-out
seeds, the final latents of the 4- and 8-step OLSS sampler and of FlowMatchEuler with 4 and 8 steps are compared with
the 28-step teacher's (RMSE).
"""
from __future__ import annotations

from typing import Any

import torch

from olss_fast import fit_olss_scheduler
from olss_fast.core.metrics import rmse
from olss_fast.pipelines.registry import adapter_for
from olss_fast.fit.work import item_noise, make_work_items

TRAIN = ["a cat", "a dog", "blue sky", "red car", "old tree", "a bird", "green hill", "a boat", "tall house",
         "small fish", "white cloud", "dark road"]
HELD_OUT = ["a horse", "gray stone", "yellow sun", "a lake", "pink flower", "a train"]
TEACHER_STEPS = 28


def final_latents(pipe: Any, scheduler: Any, prompts: list, latents: torch.Tensor, steps: int,
                  call: dict) -> torch.Tensor:
    base = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        with torch.no_grad():
            return pipe(prompts, num_inference_steps=steps, latents=latents, output_type="latent", **call).images
    finally:
        pipe.scheduler = base


def check_quality_against_teacher(pipe: Any, size: int, call: dict) -> dict:
    res = fit_olss_scheduler(pipe, TRAIN, teacher_steps=TEACHER_STEPS, num_steps=(4, 8), batch_size=6,
                             seeds_per_prompt=2, height=size, width=size, progress=False, **call)
    items = make_work_items(HELD_OUT, seeds_per_prompt=2, base_seed=777)  # other prompts, other noise
    shape = adapter_for(pipe).latent_shape(1, size, size)[1:]
    x0 = item_noise(items, shape)
    prompts = [it.prompt for it in items]
    kw = dict(call, height=size, width=size)
    euler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    teacher = final_latents(pipe, euler, prompts, x0, TEACHER_STEPS, kw)
    out = {}
    for n in (4, 8):
        olss = rmse(final_latents(pipe, res.scheduler, prompts, x0, n, kw), teacher)
        base = rmse(final_latents(pipe, euler, prompts, x0, n, kw), teacher)
        out[n] = (olss, base)
        assert olss < base, f"{n} steps: OLSS {olss:.4g} is not closer to the teacher than FlowMatchEuler {base:.4g}"
    return out
