"""Tests of olss_fast.serve.runner (compile_olss_pipeline / OLSSRunner) on tiny random pipelines built in code.

References:
* diffusers' own pipeline with ``DDIMScheduler`` and the OLSS runner with DDIM's coefficients written as an OLSS
  schedule (``olss_fast.core.step.ddim_coefficients``): independent of the OLSS scheduler;
* diffusers' pipeline with ``OLSSScheduler`` (same schedule, same noise) for arbitrary (perturbed, per-channel)
  coefficients.
Everything runs on the CPU in float32; the ``gpu`` tests compare the CUDA-graph backend with the eager one.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from olss_fast.serve.runner import OLSSRunner, compile_olss_pipeline  # noqa: E402
from olss_fast.core.schedule import OLSSSchedule  # noqa: E402
from olss_fast.core.step import ddim_coefficients  # noqa: E402
from olss_fast.testing import write_clip_tokenizer
from helpers import assert_close_scaled, perturbed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MERGES = ["a b", "ab c</w>", "h e", "l l", "he ll", "w o", "wo r"]

HAS_CUDA = torch.cuda.is_available()
N_STEPS = 4
PROMPTS = ["a hello abc", "abc world"]


# ================================================================================================ tiny components
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"), merges=MERGES)


def _clip_config(tok: Any, hidden: int = 32, projection_dim: int | None = None) -> CLIPTextConfig:
    kw = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        hidden_size=hidden, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tok) + 8, max_position_embeddings=tok.model_max_length,
    )
    if projection_dim is not None:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def _ddim(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, timestep_spacing="trailing", prediction_type=prediction_type, steps_offset=1,
    )


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=4,
    )


def make_sd_pipe(tokenizer_dir: Path, prediction_type: str = "epsilon", seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_clip_config(tok)), tokenizer=tok, unet=unet,
        scheduler=_ddim(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def make_sdxl_pipe(tokenizer_dir: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    tok2 = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=4,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_clip_config(tok)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok2, projection_dim=32)),
        tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=_ddim(), add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def make_digits_pipe(seed: int = 0) -> Any:
    """The real DigitsPipeline class with a tiny random class-conditional UNet2DModel (num_class_embeds=11)."""
    from olss_fast.models.digits import DigitsPipeline

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=11, norm_num_groups=4,
    )
    pipe = DigitsPipeline(unet=unet, scheduler=_ddim())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ================================================================================================ schedules
def ddim_schedule(scheduler_config: Any, n: int) -> OLSSSchedule:
    """DDIM's own update at its n trailing timesteps as an OLSS schedule (built from olss_fast.core.step only)."""
    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(n)
    ts = [int(t) for t in ddim.timesteps]
    ratio = ddim.config.num_train_timesteps // n
    coeffs = ddim_coefficients(
        ddim.alphas_cumprod, ts, [t - ratio for t in ts], float(ddim.final_alpha_cumprod), ddim.config.prediction_type
    )
    return OLSSSchedule(timesteps=ts, indices=list(range(n)), coeffs=coeffs, teacher_steps=n,
                        prediction_type=ddim.config.prediction_type, path="ddim")


def with_olss_scheduler(pipe: Any, schedule: OLSSSchedule) -> Any:
    from olss_fast.serve.scheduler import OLSSScheduler

    pipe.scheduler = OLSSScheduler.from_schedules([schedule], config=pipe.scheduler.config)
    return pipe


def _noise(shape: tuple, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def _close(a: Any, b: Any, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b)), atol=atol, rtol=rtol)


# ================================================================================================ SD
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd_eager_matches_diffusers_ddim(tokenizer_dir: Path, prediction_type: str) -> None:
    """DDIM's coefficients in the runner == diffusers' StableDiffusionPipeline with DDIMScheduler (same noise)."""
    pipe = make_sd_pipe(tokenizer_dir, prediction_type)
    sched = ddim_schedule(pipe.scheduler.config, N_STEPS)
    lat = _noise((2, 4, 16, 16), seed=1)
    ref = pipe(PROMPTS, num_inference_steps=N_STEPS, guidance_scale=6.0, latents=lat, output_type="np").images
    runner = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=6.0)
    assert runner.backend == "eager" and isinstance(runner, OLSSRunner)
    out = runner(PROMPTS, latents=lat, output_type="np")
    assert out.nsfw_content_detected is None
    assert out.images.shape == ref.shape == (2, 32, 32, 3)
    _close(out.images, ref, atol=2e-4, rtol=0)
    assert np.abs(ref - 0.5).max() > 0.01  # not a trivially constant image


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd_eager_matches_olss_scheduler_per_channel(tokenizer_dir: Path, prediction_type: str) -> None:
    """Arbitrary per-channel coefficients: runner == pipeline with OLSSScheduler, generator-drawn noise."""
    pipe = make_sd_pipe(tokenizer_dir, prediction_type)
    sched = perturbed(ddim_schedule(pipe.scheduler.config, N_STEPS), seed=3, channels=4)
    runner = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=5.0)
    with_olss_scheduler(pipe, sched)
    ref = pipe(PROMPTS[0], negative_prompt="world", num_inference_steps=N_STEPS, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(11), output_type="pt").images
    out = runner(PROMPTS[0], negative_prompt="world", generator=torch.Generator().manual_seed(11), output_type="pt")
    torch.testing.assert_close(out.images, ref, atol=2e-5, rtol=1e-4)
    # latent output and the tuple form
    ref_lat = pipe(PROMPTS[0], negative_prompt="world", num_inference_steps=N_STEPS, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(11), output_type="latent").images
    lat, nsfw = runner(PROMPTS[0], negative_prompt="world", generator=torch.Generator().manual_seed(11),
                       output_type="latent", return_dict=False)
    assert nsfw is None
    assert_close_scaled(lat, ref_lat, 1e-5, what="runner latents vs the diffusers pipeline")


def test_sd_without_guidance_embeds_and_pil(tokenizer_dir: Path) -> None:
    pipe = make_sd_pipe(tokenizer_dir)
    sched = perturbed(ddim_schedule(pipe.scheduler.config, 3), seed=5)
    runner = compile_olss_pipeline(pipe, sched, guidance_scale=1.0)  # auto -> eager on CPU, no CFG
    assert runner.backend == "eager"
    with_olss_scheduler(pipe, sched)
    lat = _noise((1, 4, 16, 16), seed=2)
    ref = pipe(PROMPTS[1], num_inference_steps=3, guidance_scale=1.0, latents=lat, output_type="np").images
    _close(runner(PROMPTS[1], latents=lat, output_type="np").images, ref, atol=2e-5)
    # prompt embeddings instead of text, CFG switched on per call: same as the token path
    pos, neg = pipe.encode_prompt(PROMPTS[1], "cpu", 1, True, "abc")
    a = runner(prompt_embeds=pos, negative_prompt_embeds=neg, latents=lat, guidance_scale=3.0, output_type="pt")
    b = runner(PROMPTS[1], negative_prompt="abc", latents=lat, guidance_scale=3.0, output_type="pt")
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=1e-5)
    pil = runner(PROMPTS[1], latents=lat).images
    assert len(pil) == 1 and pil[0].size == (32, 32)


def test_sd_num_images_per_prompt_and_cache(tokenizer_dir: Path) -> None:
    pipe = make_sd_pipe(tokenizer_dir)
    sched = perturbed(ddim_schedule(pipe.scheduler.config, 3), seed=6)
    runner = compile_olss_pipeline(pipe, sched, backend="eager", cache_size=2)
    with_olss_scheduler(pipe, sched)
    lat = _noise((4, 4, 16, 16), seed=4)
    ref = pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=3, latents=lat, output_type="pt").images
    out = runner(PROMPTS, num_images_per_prompt=2, latents=lat, output_type="pt").images
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert runner.cache_info()["builds"] == 1
    runner(PROMPTS, num_images_per_prompt=2, latents=lat, output_type="pt")
    assert runner.cache_info()["builds"] == 1 and runner.cache_info()["hits"] >= 1  # same signature: reused
    runner(PROMPTS[0], latents=lat[:1], output_type="pt")  # new batch -> new program instance
    runner(PROMPTS[0], latents=_noise((1, 4, 8, 8), 0), height=16, width=16, output_type="pt")  # new size
    info = runner.cache_info()
    assert info["builds"] == 3 and info["size"] == 2 and info["evictions"] == 1


def test_sd_update_schedule(tokenizer_dir: Path) -> None:
    pipe = make_sd_pipe(tokenizer_dir)
    base = ddim_schedule(pipe.scheduler.config, N_STEPS)
    s1, s2 = perturbed(base, seed=7), perturbed(base, seed=8, scale=0.2)
    runner = compile_olss_pipeline(pipe, s1, backend="eager")
    lat = _noise((1, 4, 16, 16), seed=9)
    first = runner(PROMPTS[0], latents=lat, output_type="pt").images
    runner.update_schedule(s2)
    assert runner.schedule is s2 and runner.cache_info()["builds"] == 1
    second = runner(PROMPTS[0], latents=lat, output_type="pt").images
    assert runner.cache_info()["builds"] == 1  # the same buffers, new coefficients
    ref = with_olss_scheduler(pipe, s2)(PROMPTS[0], num_inference_steps=N_STEPS, latents=lat, output_type="pt").images
    torch.testing.assert_close(second, ref, atol=2e-5, rtol=1e-4)
    assert (first - second).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs a schedule with 4 steps"):
        runner.update_schedule(ddim_schedule(pipe.scheduler.config, 3))
    with pytest.raises(ValueError, match="coefficient shape"):
        runner.update_schedule(perturbed(base, seed=1, channels=4))


def test_schedule_from_olss_scheduler(tokenizer_dir: Path) -> None:
    from olss_fast.serve.scheduler import OLSSScheduler

    pipe = make_sd_pipe(tokenizer_dir)
    s3 = perturbed(ddim_schedule(pipe.scheduler.config, 3), seed=1)
    s4 = perturbed(ddim_schedule(pipe.scheduler.config, 4), seed=2)
    scheduler = OLSSScheduler.from_schedules([s3, s4], config=pipe.scheduler.config)
    runner = compile_olss_pipeline(pipe, scheduler, num_inference_steps=4, backend="eager")
    assert runner.num_inference_steps == 4
    torch.testing.assert_close(runner.schedule.coeffs, s4.coeffs)
    with pytest.raises(ValueError, match="num_inference_steps"):
        compile_olss_pipeline(pipe, scheduler, backend="eager")  # two schedules, none chosen
    with pytest.raises(ValueError, match="not 5"):
        compile_olss_pipeline(pipe, scheduler, num_inference_steps=5, backend="eager")
    pipe.scheduler = scheduler  # schedule=None -> the pipeline's own OLSSScheduler
    assert compile_olss_pipeline(pipe, None, num_inference_steps=3, backend="eager").num_inference_steps == 3


# ================================================================================================ SDXL
def test_sdxl_eager_matches_olss_scheduler(tokenizer_dir: Path) -> None:
    pipe = make_sdxl_pipe(tokenizer_dir)
    sched = perturbed(ddim_schedule(pipe.scheduler.config, 3), seed=4, channels=4)
    runner = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=4.0)
    with_olss_scheduler(pipe, sched)
    lat = _noise((2, 4, 16, 16), seed=5)
    for negative in (None, "world"):  # zeroed negative (force_zeros_for_empty_prompt) and a real negative prompt
        ref = pipe(PROMPTS, negative_prompt=None if negative is None else [negative] * 2, num_inference_steps=3,
                   guidance_scale=4.0, latents=lat, output_type="pt").images
        out = runner(PROMPTS, negative_prompt=negative, latents=lat, output_type="pt")
        torch.testing.assert_close(out.images, ref, atol=2e-5, rtol=1e-4)
    out_t = runner(PROMPTS, latents=lat, output_type="np", return_dict=False)
    assert isinstance(out_t, tuple) and len(out_t) == 1 and out_t[0].shape == (2, 32, 32, 3)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_text_encoder_outside_program_gives_same_images(tokenizer_dir: Path, kind: str) -> None:
    """The fallback path (text encoder run before the program, via pipe.encode_prompt) == the in-program path."""
    pipe = make_sd_pipe(tokenizer_dir) if kind == "sd" else make_sdxl_pipe(tokenizer_dir)
    sched = perturbed(ddim_schedule(pipe.scheduler.config, 3), seed=12)
    inside = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=3.0)
    outside = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=3.0)
    outside.text_encoder_in_graph = False
    lat = _noise((4, 4, 16, 16), seed=13)
    for negative in (None, "world", ["world", "abc"]):
        kw = dict(negative_prompt=negative, num_images_per_prompt=2, latents=lat, output_type="pt")
        a, b = inside(PROMPTS, **kw).images, outside(PROMPTS, **kw).images
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert outside.cache_info()["entries"][0][1] == "embeds"


def test_update_schedule_with_other_timesteps_equals_a_fresh_runner() -> None:
    """Regression: ``update_schedule`` loading the new coefficients but keeping the old timesteps.

    The other schedule here has the same step count and layout but other timesteps (DDIM's leading spacing instead
    of trailing), so a runner that still evaluates the denoiser at the old timesteps gives other images than a
    runner compiled for the new schedule (and than DDIM itself on those timesteps)."""
    pipe = make_digits_pipe()
    trailing = ddim_schedule(pipe.scheduler.config, N_STEPS)
    leading_cfg = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading").config
    leading = ddim_schedule(leading_cfg, N_STEPS)
    assert set(leading.timesteps).isdisjoint(trailing.timesteps)
    lat = _noise((2, 1, 8, 8), seed=11)
    runner = compile_olss_pipeline(pipe, trailing, backend="eager", guidance_scale=2.0)
    before = runner([3, 1], latents=lat, output_type="pt").images
    runner.update_schedule(leading)
    assert runner.state.timesteps.tolist() == leading.timesteps
    after = runner([3, 1], latents=lat, output_type="pt").images
    fresh = compile_olss_pipeline(pipe, leading, backend="eager", guidance_scale=2.0)([3, 1], latents=lat,
                                                                                     output_type="pt").images
    torch.testing.assert_close(after, fresh, atol=1e-6, rtol=1e-6)
    pipe.scheduler = DDIMScheduler.from_config(leading_cfg)
    ref = pipe([3, 1], num_inference_steps=N_STEPS, guidance_scale=2.0, latents=lat, output_type="pt").images
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)
    assert (after - before).abs().max() > 1e-3


# ================================================================================================ digits
def test_digits_eager_matches_pipeline() -> None:
    pipe = make_digits_pipe()
    base = ddim_schedule(pipe.scheduler.config, N_STEPS)
    lat = _noise((3, 1, 8, 8), seed=6)
    ddim_ref = pipe([3, 1, 4], num_inference_steps=N_STEPS, guidance_scale=2.0, latents=lat, output_type="pt").images
    runner = compile_olss_pipeline(pipe, base, backend="eager", guidance_scale=2.0)
    torch.testing.assert_close(runner([3, 1, 4], latents=lat, output_type="pt").images, ddim_ref, atol=1e-5, rtol=1e-5)

    sched = perturbed(base, seed=9, channels=1)
    with pytest.raises(ValueError, match="coefficient shape"):  # per-channel layout: needs a new runner
        runner.update_schedule(sched)
    runner = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=2.0)
    with_olss_scheduler(pipe, sched)
    for output_type in ("pt", "np", "latent"):
        ref = pipe(["three", 1, "4"], negative_prompt=7, num_inference_steps=N_STEPS, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(2), output_type=output_type).images
        out = runner(["three", 1, "4"], negative_prompt=7, generator=torch.Generator().manual_seed(2),
                     output_type=output_type).images
        _close(out, ref, atol=1e-5, rtol=1e-5)
    pil = runner(class_labels=[5, 6], return_dict=False)[0]
    assert len(pil) == 2 and pil[0].mode == "L"
    ref_all = pipe(num_inference_steps=N_STEPS, guidance_scale=2.0, generator=torch.Generator().manual_seed(3),
                   output_type="pt").images
    out_all = runner(generator=torch.Generator().manual_seed(3), output_type="pt").images  # None -> digits 0..9
    torch.testing.assert_close(out_all, ref_all, atol=1e-5, rtol=1e-5)
    # without an explicit guidance scale the runner uses the pipeline's own default
    default_runner = compile_olss_pipeline(pipe, sched, backend="eager")
    ref_default = pipe([2, 7], num_inference_steps=N_STEPS, generator=torch.Generator().manual_seed(4),
                       output_type="pt").images
    torch.testing.assert_close(default_runner([2, 7], generator=torch.Generator().manual_seed(4), output_type="pt").images,
                               ref_default, atol=1e-5, rtol=1e-5)


def test_off_grid_timesteps_run_in_the_runner_as_in_the_pipeline() -> None:
    """A timestep-shifted schedule (timesteps off the DDIM grid, as ``timestep_shift=True`` fits them): the runner
    evaluates the model where the pipeline with OLSSScheduler does, and the shift is not ignored."""
    pipe = make_digits_pipe()
    base = perturbed(ddim_schedule(pipe.scheduler.config, N_STEPS), seed=4, channels=1)
    shifted = dataclasses.replace(base, timesteps=[base.timesteps[0]] + [t - 13 for t in base.timesteps[1:]])
    lat = _noise((3, 1, 8, 8), seed=8)
    with_olss_scheduler(pipe, shifted)
    ref = pipe([3, 1, 4], num_inference_steps=N_STEPS, guidance_scale=2.0, latents=lat, output_type="pt").images
    out = compile_olss_pipeline(pipe, shifted, backend="eager", guidance_scale=2.0)([3, 1, 4], latents=lat,
                                                                                     output_type="pt").images
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    on_grid = compile_olss_pipeline(pipe, base, backend="eager", guidance_scale=2.0)([3, 1, 4], latents=lat,
                                                                                     output_type="pt").images
    assert (out - on_grid).abs().max() > 1e-3


def test_bundled_digits_model_if_present() -> None:
    from olss_fast.models import digits

    try:
        pipe = digits.load_digits_pipeline()
    except ValueError as exc:
        pytest.skip(f"bundled digits weights not available: {exc}")
    base = ddim_schedule(pipe.scheduler.config, 5)
    lat = _noise((4, 1, digits.IMAGE_SIZE, digits.IMAGE_SIZE), seed=1)
    ref = pipe([0, 2, 5, 9], num_inference_steps=5, latents=lat, output_type="pt").images
    runner = compile_olss_pipeline(pipe, base, backend="eager", guidance_scale=digits.DEFAULT_GUIDANCE_SCALE)
    torch.testing.assert_close(runner([0, 2, 5, 9], latents=lat, output_type="pt").images, ref, atol=1e-4, rtol=1e-4)


# ================================================================================================ errors
def test_errors(tokenizer_dir: Path) -> None:
    pipe = make_sd_pipe(tokenizer_dir)
    sched = ddim_schedule(pipe.scheduler.config, 3)
    with pytest.raises(ValueError, match="supported pipelines"):
        compile_olss_pipeline(DDPMPipeline(unet=make_digits_pipe().unet, scheduler=_ddim()), sched)
    with pytest.raises(ValueError, match="supported pipelines"):
        compile_olss_pipeline(object(), sched)
    with pytest.raises(ValueError, match="unknown backend"):
        compile_olss_pipeline(pipe, sched, backend="tensorrt_fast")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="CUDA"):
            compile_olss_pipeline(pipe, sched, backend="cuda_graph")
    with pytest.raises(ValueError, match="per-channel coefficients for 3 channels"):
        compile_olss_pipeline(pipe, perturbed(sched, 0, channels=3))
    with pytest.raises(ValueError, match="schedule has 3 steps"):
        compile_olss_pipeline(pipe, sched, num_inference_steps=4)
    with pytest.raises(ValueError, match="OLSSSchedule"):
        compile_olss_pipeline(pipe, {"timesteps": [1]})
    with pytest.raises(ValueError, match="divisible by 8"):
        compile_olss_pipeline(pipe, sched, height=36)

    runner = compile_olss_pipeline(pipe, sched, backend="eager")
    with pytest.raises(ValueError, match="wrong shape"):
        runner(PROMPTS[0], latents=torch.zeros(1, 4, 8, 16))
    with pytest.raises(ValueError, match="batch size mismatch"):
        runner(PROMPTS[0], latents=torch.zeros(2, 4, 16, 16))
    with pytest.raises(ValueError, match="batch size mismatch"):
        runner(PROMPTS, negative_prompt=["x", "y", "z"])
    with pytest.raises(ValueError, match="batch size mismatch"):
        runner(PROMPTS, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="batch size mismatch"):
        pos, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        runner(prompt_embeds=pos, negative_prompt_embeds=neg[:1])
    with pytest.raises(ValueError, match="unsupported argument"):
        runner(PROMPTS[0], eta=0.5)
    with pytest.raises(ValueError, match="3-step schedule"):
        runner(PROMPTS[0], num_inference_steps=10)
    with pytest.raises(ValueError, match="output_type"):
        runner(PROMPTS[0], output_type="jpeg")
    with pytest.raises(ValueError, match="either `prompt` or `prompt_embeds`"):
        runner()
    with pytest.raises(ValueError, match="class labels"):
        compile_olss_pipeline(make_digits_pipe(), ddim_schedule(_ddim().config, 3))(
            prompt_embeds=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="digit"):
        compile_olss_pipeline(make_digits_pipe(), ddim_schedule(_ddim().config, 3))(prompt=[12])


def test_prediction_type_mismatch_is_refused_unless_allowed(tokenizer_dir: Path) -> None:
    pipe = make_sd_pipe(tokenizer_dir, "v_prediction")
    eps = ddim_schedule(_ddim("epsilon").config, 3)
    with pytest.raises(ValueError, match="prediction type: fitted for 'epsilon', used with 'v_prediction'"):
        compile_olss_pipeline(pipe, eps, backend="eager")
    runner = compile_olss_pipeline(pipe, eps, backend="eager", allow_mismatch=("prediction_type",))
    assert runner.num_inference_steps == 3


# ================================================================================================ graph plumbing (CPU)
# What runs where: on the CPU, serve/cuda_graph.py's capture/replay plumbing runs only through _FakeCapture below, a
# stand-in for CapturedGraph (no torch.cuda.CUDAGraph is ever captured here). The real CapturedGraph is exercised
# only by the gpu-marked tests at the end of this file (test_gpu_*), which skip without CUDA and which
# benchmarks/gpu_check.sh runs (`pytest -m gpu`). A CPU-only pass of this file says nothing about real graphs.
class _FakeCapture:
    """Stands in for CapturedGraph on the CPU with CUDA-graph semantics: static outputs overwritten by each replay."""

    captures = 0
    fail_modes: tuple = ()

    def __init__(self, key: Any, fn: Any, inputs: Any, *, state: Any = None, warmup_iters: int = 2,
                 device: Any = None, pool: Any = None) -> None:
        mode = key[1]
        for _ in range(warmup_iters):
            fn()
        if mode in type(self).fail_modes:
            raise RuntimeError(f"operation not permitted when stream is capturing ({mode})")
        self.key, self.inputs, self._fn = key, inputs, fn
        self.outputs = fn().clone()
        type(self).captures += 1

    def replay(self, values: Any) -> torch.Tensor:
        self.inputs.load(values)
        self.outputs.copy_(self._fn())
        return self.outputs


def _fake_graph_runner(pipe: Any, sched: OLSSSchedule, monkeypatch: pytest.MonkeyPatch, fail: tuple = ()) -> Any:
    import olss_fast.serve.torch_backend as rt

    monkeypatch.setattr(_FakeCapture, "captures", 0)
    monkeypatch.setattr(_FakeCapture, "fail_modes", fail)
    monkeypatch.setattr(rt, "CapturedGraph", _FakeCapture)
    runner = compile_olss_pipeline(pipe, sched, backend="eager")
    runner.backend = runner._program.setup.backend = "cuda_graph"  # drive the capture/replay path with the fake graph
    return runner


def test_graph_plumbing_static_outputs_are_cloned(tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = make_sd_pipe(tokenizer_dir)
    sched = perturbed(ddim_schedule(pipe.scheduler.config, 3), seed=2)
    eager = compile_olss_pipeline(pipe, sched, backend="eager")
    graphed = _fake_graph_runner(pipe, sched, monkeypatch)
    l1, l2 = _noise((1, 4, 16, 16), 1), _noise((1, 4, 16, 16), 2)
    a = graphed(PROMPTS[0], latents=l1, output_type="pt").images
    b = graphed(PROMPTS[1], latents=l2, output_type="pt").images  # replay overwrites the static outputs
    torch.testing.assert_close(a, eager(PROMPTS[0], latents=l1, output_type="pt").images, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b, eager(PROMPTS[1], latents=l2, output_type="pt").images, atol=1e-6, rtol=1e-6)
    lat_out = graphed(PROMPTS[0], latents=l1, output_type="latent").images
    graphed(PROMPTS[1], latents=l2, output_type="latent")
    torch.testing.assert_close(lat_out, eager(PROMPTS[0], latents=l1, output_type="latent").images)
    assert _FakeCapture.captures == 2 and graphed.cache_info()["captures"] == 2  # decode / latent programs
    assert graphed.text_encoder_in_graph


def test_graph_plumbing_text_encoder_fallback(tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    pipe = make_sd_pipe(tokenizer_dir)
    sched = perturbed(ddim_schedule(pipe.scheduler.config, 3), seed=3)
    eager = compile_olss_pipeline(pipe, sched, backend="eager")
    graphed = _fake_graph_runner(pipe, sched, monkeypatch, fail=("tokens",))
    lat = _noise((2, 4, 16, 16), 3)
    with caplog.at_level(logging.WARNING, logger="olss_fast.serve.runner"):
        out = graphed(PROMPTS, latents=lat, output_type="pt").images
    assert not graphed.text_encoder_in_graph
    assert any("text encoder" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, eager(PROMPTS, latents=lat, output_type="pt").images, atol=1e-5, rtol=1e-5)
    # a capture failure that is not the text encoder's is a clear error
    graphed = _fake_graph_runner(pipe, sched, monkeypatch, fail=("tokens", "embeds"))
    with pytest.raises(RuntimeError, match="backend='eager'"):
        graphed(PROMPTS, latents=lat, output_type="pt")


# ================================================================================================ GPU
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _gpu_sd(tokenizer_dir: Path, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    return make_sd_pipe(tokenizer_dir, prediction_type).to("cuda", torch.float16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_gpu_graph_matches_eager_and_diffusers(tokenizer_dir: Path, prediction_type: str) -> None:
    pipe = _gpu_sd(tokenizer_dir, prediction_type)
    sched = perturbed(ddim_schedule(pipe.scheduler.config, N_STEPS), seed=1, channels=4)
    graphed = compile_olss_pipeline(pipe, sched, backend="cuda_graph", guidance_scale=5.0)
    eager = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=5.0)
    assert graphed.backend == "cuda_graph"
    lat = _noise((2, 4, 16, 16), seed=3, dtype=torch.float16, device="cuda")
    a = graphed(PROMPTS, latents=lat, output_type="pt").images
    assert graphed.text_encoder_in_graph, "the text encoder could not be captured (see the warning log)"
    b = eager(PROMPTS, latents=lat, output_type="pt").images
    torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)
    ref = with_olss_scheduler(pipe, sched)(PROMPTS, num_inference_steps=N_STEPS, guidance_scale=5.0, latents=lat,
                                           output_type="pt").images
    torch.testing.assert_close(a.float(), ref.float(), atol=2e-2, rtol=2e-2)
    # replay with new noise and a new prompt: still equal to eager
    lat2 = _noise((2, 4, 16, 16), seed=4, dtype=torch.float16, device="cuda")
    a2 = graphed(PROMPTS[::-1], latents=lat2, output_type="pt").images
    b2 = eager(PROMPTS[::-1], latents=lat2, output_type="pt").images
    torch.testing.assert_close(a2.float(), b2.float(), atol=1e-2, rtol=1e-2)
    assert graphed.cache_info()["captures"] == 1
    assert (a2 - a).abs().max() > 1e-3


@pytest.mark.gpu
@gpu
def test_gpu_recapture_on_new_shape_and_lru(tokenizer_dir: Path) -> None:
    pipe = _gpu_sd(tokenizer_dir)
    sched = perturbed(ddim_schedule(pipe.scheduler.config, 3), seed=2)
    graphed = compile_olss_pipeline(pipe, sched, backend="cuda_graph", cache_size=2, batch_size=1, warmup=True)
    eager = compile_olss_pipeline(pipe, sched, backend="eager")
    assert graphed.cache_info()["captures"] == 1
    # cache of 2, least recently used evicted: (1,32) warm -> +(2,32) -> hit (1,32) -> +(1,48) evicts (2,32)
    # -> (2,32) re-captured, evicts (1,32) -> (1,32) re-captured
    for batch, size, captures in [(1, 32, 1), (2, 32, 2), (1, 32, 2), (1, 48, 3), (2, 32, 4), (1, 32, 5)]:
        lat = _noise((batch, 4, size // 2, size // 2), seed=batch * size, dtype=torch.float16, device="cuda")
        a = graphed(PROMPTS[:batch], latents=lat, height=size, width=size, output_type="pt").images
        b = eager(PROMPTS[:batch], latents=lat, height=size, width=size, output_type="pt").images
        assert a.shape == (batch, 3, size, size)
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)
        assert graphed.cache_info()["captures"] == captures, (batch, size, graphed.cache_info())
    assert graphed.cache_info()["size"] == 2
    # output_type="latent" is a different program (no decode)
    lat = _noise((1, 4, 16, 16), seed=0, dtype=torch.float16, device="cuda")
    la = graphed(PROMPTS[0], latents=lat, output_type="latent").images
    lb = eager(PROMPTS[0], latents=lat, output_type="latent").images
    torch.testing.assert_close(la.float(), lb.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@gpu
def test_gpu_update_schedule_reuses_graph(tokenizer_dir: Path) -> None:
    pipe = _gpu_sd(tokenizer_dir)
    base = ddim_schedule(pipe.scheduler.config, N_STEPS)
    s1, s2 = perturbed(base, seed=3), perturbed(base, seed=4, scale=0.2)
    graphed = compile_olss_pipeline(pipe, s1, backend="cuda_graph")
    lat = _noise((1, 4, 16, 16), seed=5, dtype=torch.float16, device="cuda")
    first = graphed(PROMPTS[0], latents=lat, output_type="pt").images
    graphed.update_schedule(s2)
    second = graphed(PROMPTS[0], latents=lat, output_type="pt", guidance_scale=3.0).images
    assert graphed.cache_info()["captures"] == 1
    eager = compile_olss_pipeline(pipe, s2, backend="eager")
    ref = eager(PROMPTS[0], latents=lat, output_type="pt", guidance_scale=3.0).images
    torch.testing.assert_close(second.float(), ref.float(), atol=1e-2, rtol=1e-2)
    assert (first - second).abs().max() > 1e-3
    with pytest.raises(ValueError, match="steps"):
        graphed.update_schedule(ddim_schedule(pipe.scheduler.config, 3))


@pytest.mark.gpu
@gpu
def test_gpu_sdxl_and_digits_graphs(tokenizer_dir: Path) -> None:
    pipe = make_sdxl_pipe(tokenizer_dir).to("cuda", torch.float16)
    sched = perturbed(ddim_schedule(pipe.scheduler.config, 3), seed=5)
    lat = _noise((2, 4, 16, 16), seed=6, dtype=torch.float16, device="cuda")
    for negative in (None, "world"):
        a = compile_olss_pipeline(pipe, sched, backend="cuda_graph")(PROMPTS, negative_prompt=negative, latents=lat,
                                                                   output_type="pt").images
        b = compile_olss_pipeline(pipe, sched, backend="eager")(PROMPTS, negative_prompt=negative, latents=lat,
                                                              output_type="pt").images
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)

    dpipe = make_digits_pipe().to("cuda")
    dsched = perturbed(ddim_schedule(dpipe.scheduler.config, 4), seed=7)
    dl = _noise((3, 1, 8, 8), seed=8, device="cuda")
    a = compile_olss_pipeline(dpipe, dsched, backend="cuda_graph", guidance_scale=2.0)([1, 2, 3], latents=dl,
                                                                                        output_type="pt").images
    ref = with_olss_scheduler(dpipe, dsched)([1, 2, 3], num_inference_steps=4, guidance_scale=2.0, latents=dl,
                                             output_type="pt").images
    torch.testing.assert_close(a, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.skipif(not __import__("os").environ.get("OLSS_FAST_TEST_COMPILE"),
                    reason="torch.compile of every module takes a while; set OLSS_FAST_TEST_COMPILE=1")
def test_gpu_compiled_program_in_graph(tokenizer_dir: Path, tmp_path: Path) -> None:
    pipe = _gpu_sd(tokenizer_dir)
    sched = perturbed(ddim_schedule(pipe.scheduler.config, 3), seed=9)
    lat = _noise((1, 4, 16, 16), seed=1, dtype=torch.float16, device="cuda")
    runner = compile_olss_pipeline(pipe, sched, backend="cuda_graph", compile=True, cache_dir=tmp_path)
    assert runner.text_encoder_in_graph
    a = runner(PROMPTS[0], latents=lat, output_type="pt").images
    b = compile_olss_pipeline(pipe, sched, backend="eager")(PROMPTS[0], latents=lat, output_type="pt").images
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
