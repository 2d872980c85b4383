"""Flux end to end on a tiny random FluxPipeline built in code (a CLIP and a T5 encoder with offline tokenizers, a
Flux transformer with a distilled guidance embedding, packed latents, dynamic shifting): record + search + re-fit
through the pipeline, the searched OLSSScheduler inside the unmodified pipeline (it passes sigmas and mu), the eager
runner and the ONNX export against it — with the distilled guidance and with true CFG — and quality on held-out
prompts and seeds against a 28-step teacher."""
from __future__ import annotations

import logging

import pytest
import torch

from olss_fast import compile_olss_pipeline, fit_olss_scheduler
from olss_fast.pipelines.registry import adapter_for
from olss_fast.testing import tiny_flux_pipeline
from helpers import assert_close_scaled

from flow_quality import check_quality_against_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32  # a 16x16 latent grid, packed 2x2 into 64 tokens of 16 channels
KW = dict(height=SIZE, width=SIZE, max_sequence_length=16)


@pytest.fixture(scope="module")
def fitted():
    pipe = tiny_flux_pipeline()
    res = fit_olss_scheduler(pipe, ["a cat", "a dog", "blue sky", "red car"], teacher_steps=12, num_steps=(3, 4),
                             batch_size=2, guidance_scale=3.5, progress=False, **KW)
    return pipe, res


def noise(pipe, seed, batch=1):
    return torch.randn(adapter_for(pipe).latent_shape(batch, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def test_fit_records_packed_latents_with_the_resolution_shift(fitted):
    pipe, res = fitted
    s = res.schedules[4]
    assert res.stats.sample_shape == (64, 16) and s.fitted_for["latent_shape"] == [64, 16]
    assert s.prediction_type == "flow" and s.refined
    assert s.fitted_for["mu"] == pytest.approx(adapter_for(pipe).flow_mu(SIZE, SIZE))
    assert s.fitted_for["guidance_scale"] == 3.5  # the distilled guidance the recording ran at


@pytest.mark.parametrize("cfg", [{}, {"true_cfg_scale": 2.0, "negative_prompt": "dark"}], ids=["distilled", "true_cfg"])
def test_searched_scheduler_runs_in_the_pipeline_and_the_runner_equals_it(fitted, cfg):
    pipe, res = fitted
    base = pipe.scheduler
    lat = noise(pipe, 1, batch=2)
    call = dict(guidance_scale=3.5, **cfg)
    try:
        pipe.scheduler = res.scheduler
        ref = pipe(["a bird", "old tree"], num_inference_steps=4, latents=lat, output_type="latent", **call,
                   **KW).images
        ref_img = pipe(["a bird", "old tree"], num_inference_steps=4, latents=lat, output_type="pt", **call,
                       **KW).images
    finally:
        pipe.scheduler = base
    runner = compile_olss_pipeline(pipe, res.scheduler, num_inference_steps=4, backend="eager", height=SIZE,
                                   width=SIZE)
    got = runner(["a bird", "old tree"], latents=lat, output_type="latent", max_sequence_length=16, **call).images
    assert got.shape == (2, 64, 16)
    assert_close_scaled(got, ref, 1e-4)
    img = runner(["a bird", "old tree"], latents=lat, output_type="pt", max_sequence_length=16, **call).images
    assert_close_scaled(img, ref_img, 1e-4)


def test_another_size_warns_about_the_resolution_shift(fitted, caplog):
    pipe, res = fitted
    runner = compile_olss_pipeline(pipe, res.scheduler, num_inference_steps=3, backend="eager", height=SIZE,
                                   width=SIZE)
    with caplog.at_level(logging.WARNING):
        runner("a bird", height=48, width=48, max_sequence_length=16, output_type="latent")
    assert any("mu = " in r.message and "latent_shape" not in r.message for r in caplog.records)
    assert any("latent_shape = [64, 16]" in r.message for r in caplog.records)


def test_onnx_export_equals_eager(fitted, tmp_path):
    pytest.importorskip("onnxscript")  # Flux's RMSNorm needs the dynamo exporter
    pipe, res = fitted
    lat = noise(pipe, 2)
    kw = dict(latents=lat, max_sequence_length=16, guidance_scale=3.5, true_cfg_scale=2.0, negative_prompt="dark")
    eager = compile_olss_pipeline(pipe, res.scheduler, num_inference_steps=3, backend="eager", height=SIZE,
                                  width=SIZE)
    fast = compile_olss_pipeline(pipe, res.scheduler, num_inference_steps=3, backend="onnxruntime", height=SIZE,
                                 width=SIZE, cache_dir=str(tmp_path))
    for output_type in ("latent", "np"):
        a = eager("a bird", output_type=output_type, **kw).images
        b = fast("a bird", output_type=output_type, **kw).images
        assert_close_scaled(b, a, 1e-4, what=output_type)


def test_held_out_quality_beats_flow_match_euler():
    """4 and 8 OLSS steps are closer to the 28-step teacher than FlowMatchEuler at 4 and 8 steps, on held-out prompts
    and seeds."""
    check_quality_against_teacher(tiny_flux_pipeline(), SIZE, dict(guidance_scale=3.5, max_sequence_length=16))
