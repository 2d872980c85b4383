"""Stable Diffusion 3 end to end on a tiny random StableDiffusion3Pipeline built in code (two CLIP encoders, a T5
encoder with an offline tokenizer, an MMDiT transformer): record + search + re-fit through the pipeline with its own
FlowMatchEulerDiscreteScheduler, the searched OLSSScheduler inside the unmodified pipeline, the eager runner and the
ONNX export against it, and quality on held-out prompts and seeds against a 28-step teacher."""
from __future__ import annotations

import pytest
import torch

from olss_fast import compile_olss_pipeline, fit_olss_scheduler
from olss_fast.pipelines.registry import adapter_for
from olss_fast.testing import tiny_sd3_pipeline
from helpers import assert_close_scaled

from flow_quality import check_quality_against_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
KW = dict(height=SIZE, width=SIZE, max_sequence_length=16)
TRAIN = ["a cat", "a dog", "blue sky", "red car", "old tree", "a bird", "green hill", "a boat"]


@pytest.fixture(scope="module")
def fitted():
    pipe = tiny_sd3_pipeline()
    res = fit_olss_scheduler(pipe, TRAIN[:4], teacher_steps=12, num_steps=(3, 4), batch_size=2, guidance_scale=4.0,
                             progress=False, **KW)
    return pipe, res


def noise(pipe, seed, batch=1):
    shape = adapter_for(pipe).latent_shape(batch, SIZE, SIZE)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_fit_records_the_pipelines_own_flow_teacher(fitted):
    pipe, res = fitted
    s = res.schedules[4]
    assert s.prediction_type == "flow" and s.refined and all(isinstance(t, float) for t in s.timesteps)
    assert res.stats.teacher.startswith("FlowMatchEulerDiscreteScheduler(12 steps")
    teacher = type(pipe.scheduler).from_config(pipe.scheduler.config)
    teacher.set_timesteps(12)
    assert [res.stats.timesteps[i] for i in s.indices] == [float(teacher.timesteps[i]) for i in s.indices]
    assert s.fitted_for["latent_shape"] == [16, 8, 8] and s.fitted_for["guidance_scale"] == 4.0
    assert res.scheduler.is_flow and res.scheduler.config.shift == pipe.scheduler.config.shift


def test_searched_scheduler_runs_in_the_pipeline_and_the_runner_equals_it(fitted):
    pipe, res = fitted
    base = pipe.scheduler
    lat = noise(pipe, 1, batch=2)
    try:
        pipe.scheduler = res.scheduler
        ref = pipe(["a bird", "old tree"], num_inference_steps=4, latents=lat, output_type="latent",
                   guidance_scale=4.0, **KW).images
        ref_img = pipe(["a bird", "old tree"], num_inference_steps=4, latents=lat, output_type="pt",
                       guidance_scale=4.0, negative_prompt="dark", **KW).images
    finally:
        pipe.scheduler = base
    runner = compile_olss_pipeline(pipe, res.scheduler, num_inference_steps=4, backend="eager", height=SIZE,
                                   width=SIZE, guidance_scale=4.0)
    got = runner(["a bird", "old tree"], latents=lat, output_type="latent", max_sequence_length=16).images
    assert_close_scaled(got, ref, 1e-4)
    img = runner(["a bird", "old tree"], latents=lat, output_type="pt", negative_prompt="dark",
                 max_sequence_length=16).images
    assert_close_scaled(img, ref_img, 1e-4)
    assert img.shape == (2, 3, SIZE, SIZE)


def test_onnx_export_equals_eager(fitted, tmp_path):
    pytest.importorskip("onnxruntime")
    pipe, res = fitted
    lat = noise(pipe, 2)
    kw = dict(latents=lat, max_sequence_length=16)
    eager = compile_olss_pipeline(pipe, res.scheduler, num_inference_steps=3, backend="eager", height=SIZE,
                                  width=SIZE, guidance_scale=4.0)
    fast = compile_olss_pipeline(pipe, res.scheduler, num_inference_steps=3, backend="onnxruntime", height=SIZE,
                                 width=SIZE, guidance_scale=4.0, cache_dir=str(tmp_path))
    for output_type in ("latent", "np"):
        a = eager("a bird", output_type=output_type, **kw).images
        b = fast("a bird", output_type=output_type, **kw).images
        assert_close_scaled(b, a, 1e-4, what=output_type)
    # the standalone runner takes the conditioning by name (the text encoders stay outside the export)
    from olss_fast.export.onnx_runner import OnnxOLSSRunner

    export = next((tmp_path / "onnx").iterdir())
    standalone = OnnxOLSSRunner(export)
    assert list(standalone.cond_inputs) == ["encoder_hidden_states", "pooled_projections"]
    assert standalone.text_input is None and not standalone.has_text_encoder


def test_held_out_quality_beats_flow_match_euler():
    """4 and 8 OLSS steps are closer to the 28-step teacher than FlowMatchEuler at 4 and 8 steps, on held-out prompts
    and seeds."""
    check_quality_against_teacher(tiny_sd3_pipeline(), SIZE, dict(guidance_scale=4.0, max_sequence_length=16))
