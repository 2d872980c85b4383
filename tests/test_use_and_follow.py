"""Where users put a schedule, nothing runs silently wrong: the scheduler checks what it sees and says once what it
cannot; ``use_olss_scheduler`` checks the rest; runners follow every change of their pipeline; the same seed gives
the same image; ``OLSSScheduler`` has DDIM's defaults. Each test names the wrong result it guards against."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from olss_fast import OLSSScheduler, compile_olss_pipeline, fit_olss_scheduler, use_olss_scheduler
from olss_fast.core.provenance import scheduler_prediction_type
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.step import ddim_step_factors, unroll_linear_steps
from olss_fast.fit.teacher import default_teacher
from olss_fast.pipelines import adapter_for
from olss_fast.pipelines.facts import latent_shape
from olss_fast.pipelines.provenance import recording_context
from olss_fast.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from helpers import assert_close_scaled, perturbed

pytestmark = pytest.mark.usefixtures("one_thread")


def fitted_schedule(pipe: Any, n: int, seed: int = 1, guidance: float = 7.5, **size: int) -> OLSSSchedule:
    """A schedule carrying the ``fitted_for`` a recording on ``pipe`` would give it, with DDIM's (VP) or Euler's
    (flow matching) coefficients on the teacher's own n timesteps, perturbed."""
    teacher = default_teacher(pipe.scheduler)
    adapter = adapter_for(pipe)
    h, w = size.get("height") or adapter.default_size()[0], size.get("width") or adapter.default_size()[1]
    if scheduler_prediction_type(teacher) == "flow":
        teacher.set_timesteps(**adapter.teacher_timestep_kwargs(teacher, n, h, w))
        sig = [float(x) for x in teacher.sigmas]
        timesteps, prediction = [float(t) for t in teacher.timesteps], "flow"
        coeffs = unroll_linear_steps([ddim_step_factors(sig[j], sig[j + 1], "flow") for j in range(n)])
    else:
        base = OLSSScheduler.from_config(pipe.scheduler.config).ddim_schedule(n)
        timesteps, coeffs, prediction = base.timesteps, base.coeffs, base.prediction_type
    fitted_for = recording_context(pipe=pipe, teacher=teacher, teacher_steps=n, guidance_scale=guidance,
                                   latent_shape=latent_shape(pipe, h, w), prompts=[], call_kwargs={},
                                   mu=adapter.flow_mu(h, w))
    s = OLSSSchedule(timesteps=timesteps, indices=list(range(n)), coeffs=coeffs, teacher_steps=n,
                     prediction_type=prediction, path="ddim", fitted_for=fitted_for)
    return perturbed(s, seed=seed)


def noise(shape: tuple, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    """olss_fast's warnings, less the one-time warning of the paper's fit (``refine=False``, which these tests use
    for speed; tests/test_heldout_guard.py checks it)."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("olss_fast")
            and "returns the paper's fit" not in r.getMessage()]


# ================================================================================================ the scheduler
def test_a_plain_swap_refuses_latents_of_another_model_family():
    """A Stable Diffusion schedule put into an SD3 pipeline ran with relative error 13.6: the first step's 16-channel
    latents against the 4 channels it was fitted for are refused."""
    sd = tiny_sd_pipeline()
    sd3 = tiny_sd3_pipeline()
    sched = OLSSScheduler.from_schedules([fitted_schedule(sd, 3)], config=sd.scheduler.config)
    sd3.scheduler = sched
    with pytest.raises(ValueError, match=r"fitted for latents of shape \[4, 8, 8\].*another model family"):
        sd3("a cat", num_inference_steps=3, output_type="latent", max_sequence_length=16)


def test_a_plain_swap_says_once_what_it_cannot_check_and_warns_at_another_size(caplog):
    """An epsilon schedule in a v-prediction pipeline, other weights or guidance ran silently: the plain swap cannot
    see them and says so once; another latent size warns."""
    pipe = tiny_sd_pipeline()
    sched = OLSSScheduler.from_schedules([fitted_schedule(pipe, 3)], config=pipe.scheduler.config)
    pipe.scheduler = sched
    with caplog.at_level(logging.WARNING):
        pipe("a cat", num_inference_steps=3, output_type="latent")
        pipe("a cat", num_inference_steps=3, output_type="latent")
        pipe("a cat", num_inference_steps=3, height=32, width=32, output_type="latent")
    messages = warnings_of(caplog)
    assert sum("without olss_fast.use_olss_scheduler" in m for m in messages) == 1
    assert sum("latent_shape = [4, 8, 8] but runs at latent_shape = [4, 16, 16]" in m for m in messages) == 1


def test_use_olss_scheduler_checks_what_the_plain_swap_cannot(caplog):
    """use_olss_scheduler refuses an epsilon schedule on a v-prediction pipeline, a schedule of another UNet config
    and an SD schedule in SDXL (all ran silently through the plain swap), warns for other weights and another guidance
    scale, and installs a matching schedule without a warning."""
    pipe = tiny_sd_pipeline()
    eps = fitted_schedule(pipe, 3)
    v_pipe = tiny_sd_pipeline(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="prediction type: fitted for 'epsilon', used with 'v_prediction'"):
        use_olss_scheduler(v_pipe, [eps])
    assert isinstance(v_pipe.scheduler, DDIMScheduler)  # nothing installed
    with pytest.raises(ValueError, match="model: fitted for UNet2DConditionModel"):
        use_olss_scheduler(tiny_sd_pipeline(sample_size=16), [eps])  # another UNet config
    with pytest.raises(ValueError, match="model: fitted for UNet2DConditionModel"):
        use_olss_scheduler(tiny_sdxl_pipeline(), [eps])
    with caplog.at_level(logging.WARNING):
        installed = use_olss_scheduler(tiny_sd_pipeline(seed=5), eps, guidance_scale=3.0)  # other weights, guidance
    messages = warnings_of(caplog)
    assert any("other weights of the same UNet2DConditionModel" in m for m in messages)
    assert any("guidance_scale = 7.5 but runs at guidance_scale = 3.0" in m for m in messages)
    assert installed.checked_for == "StableDiffusionPipeline"
    caplog.clear()
    sched = use_olss_scheduler(pipe, eps)
    with caplog.at_level(logging.WARNING):
        out = pipe("a cat", num_inference_steps=3, output_type="latent").images
    assert pipe.scheduler is sched and out.shape == (1, 4, 8, 8) and warnings_of(caplog) == []


def test_img2img_at_strength_one_starts_from_noise_and_is_allowed():
    """SD3 img2img at strength 1.0 starts from pure noise (σ = 1) but was refused; strength < 1 still is."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = tiny_sd3_pipeline()
    sched = use_olss_scheduler(pipe, [fitted_schedule(pipe, 3, guidance=7.0)], guidance_scale=7.0)
    img2img = StableDiffusion3Img2ImgPipeline(**pipe.components)
    image = torch.rand(1, 3, 16, 16)
    got = img2img("a cat", image=image, strength=1.0, num_inference_steps=3, output_type="latent",
                  max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images
    assert got.shape == (1, 16, 8, 8) and torch.isfinite(got).all() and sched.running_searched_schedule
    with pytest.raises(ValueError, match="strength < 1"):
        img2img("a cat", image=image, strength=0.6, num_inference_steps=3, output_type="latent",
                max_sequence_length=16)


def test_from_pretrained_names_what_is_wrong(tmp_path):
    """A DDIM scheduler folder says to use from_config; a missing local folder is a ValueError naming it (was the
    Hub's OSError)."""
    DDIMScheduler().save_pretrained(tmp_path / "scheduler")
    with pytest.raises(ValueError, match=r"DDIMScheduler config.*OLSSScheduler.from_config"):
        OLSSScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    with pytest.raises(ValueError, match=f"no scheduler at {tmp_path / 'missing'}"):
        OLSSScheduler.from_pretrained(tmp_path / "missing")


# ================================================================================================ DDIM's defaults
@pytest.mark.parametrize("config", [
    {}, {"set_alpha_to_one": False}, {"prediction_type": "v_prediction"}, {"steps_offset": 1},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
], ids=["defaults", "alpha_to_one", "v_prediction", "steps_offset", "scaled_linear"])
def test_without_a_searched_schedule_it_is_ddim_with_ddims_defaults(config):
    """OLSSScheduler(**partial) used trailing spacing and no clipping: full loops differed from DDIMScheduler's (by up
    to 56.6 on SD 1.x's shipped PNDM config). Full loops with and without noise, bitwise."""
    for n, eta in ((10, 0.0), (7, 0.5)):
        ours, ddim = OLSSScheduler(**config), DDIMScheduler(**config)
        ours.set_timesteps(n)
        ddim.set_timesteps(n)
        assert torch.equal(ours.timesteps, ddim.timesteps)
        x_a = x_b = noise((2, 3, 8, 8), n) * 3
        for t in ddim.timesteps:
            out = torch.tanh(x_a) * 1.5
            x_a = ours.step(out, t, x_a, eta=eta, generator=torch.Generator().manual_seed(int(t))).prev_sample
            x_b = ddim.step(out, t, x_b, eta=eta, generator=torch.Generator().manual_seed(int(t))).prev_sample
        assert torch.equal(x_a, x_b)


def test_from_config_of_sd1_pndm_config_is_ddim_from_config():
    pndm = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                         steps_offset=1, set_alpha_to_one=False)
    ours, ddim = OLSSScheduler.from_config(pndm.config), DDIMScheduler.from_config(pndm.config)
    ours.set_timesteps(20)
    ddim.set_timesteps(20)
    assert torch.equal(ours.timesteps, ddim.timesteps) and ours.config.clip_sample == ddim.config.clip_sample


# ================================================================================================ runners follow
def _onnx_runner(pipe: Any, tmp_path: Any, sched: OLSSSchedule) -> Any:
    return compile_olss_pipeline(pipe, sched, backend="onnxruntime", guidance_scale=2.0, cache_dir=str(tmp_path),
                                 allow_mismatch=("model",))


def _eager(pipe: Any, sched: OLSSSchedule, lat: torch.Tensor) -> torch.Tensor:
    runner = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=2.0, allow_mismatch=("model",))
    return runner("a cat", latents=lat, output_type="latent").images


@pytest.mark.parametrize("change", ["disable_adapters", "set_adapters", "freeu", "attn_processor", "unsampled_weight"])
def test_the_onnxruntime_runner_follows_every_change_of_its_pipeline(change, tmp_path):
    """Each of these changes left the onnxruntime runner on its old export (largest difference to the pipeline 2.9 to
    635): it now notices the change before the call and exports again."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("onnxruntime")
    pipe = tiny_sd_pipeline()
    sched = fitted_schedule(pipe, 2, guidance=2.0)
    if change in ("disable_adapters", "set_adapters"):
        pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"],
                                              init_lora_weights=False), adapter_name="style")
    fast = _onnx_runner(pipe, tmp_path, sched)
    lat = noise((1, 4, 8, 8), 3)
    before = fast("a cat", latents=lat, output_type="latent").images
    if change == "disable_adapters":
        pipe.unet.disable_adapters()
    elif change == "set_adapters":
        pipe.unet.set_adapters(["style"], [0.3])
    elif change == "freeu":
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    elif change == "attn_processor":
        from diffusers.models.attention_processor import AttnProcessor

        class Halved(AttnProcessor):
            def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
                return 0.5 * super().__call__(*args, **kwargs)

        pipe.unet.set_attn_processor(Halved())
    else:  # an in-place .data edit of one weight the old 16-value sample never read
        w = pipe.unet.conv_in.weight
        with torch.no_grad():
            w.data.view(-1)[w.numel() // 16 + 1] += 5.0
    after = fast("a cat", latents=lat, output_type="latent").images
    want = _eager(pipe, sched, lat)
    assert_close_scaled(after, want, 1e-5, what=f"onnxruntime after {change} vs the pipeline")
    assert (after - before).abs().max() > 1e-3
    assert fast.cache_info()["num_exports"] == 2


def test_a_runner_compiled_from_pipe_scheduler_follows_a_new_scheduler():
    """pipe.scheduler replaced by another fitted OLSSScheduler after compiling from it: the runner kept running the
    old schedule (difference 13.4); it now loads the new one (and refuses one without its step count)."""
    pipe = tiny_sd_pipeline()
    a, b = fitted_schedule(pipe, 3, seed=1), fitted_schedule(pipe, 3, seed=2)
    use_olss_scheduler(pipe, a)
    runner = compile_olss_pipeline(pipe, backend="eager")
    lat = noise((1, 4, 8, 8), 4)
    runner("a cat", latents=lat, output_type="latent")
    use_olss_scheduler(pipe, b)
    got = runner("a cat", latents=lat, output_type="latent").images
    fresh = compile_olss_pipeline(pipe, b, backend="eager")
    assert torch.equal(runner.schedule.coeffs, b.coeffs)
    assert_close_scaled(got, fresh("a cat", latents=lat, output_type="latent").images, 1e-6)
    use_olss_scheduler(pipe, fitted_schedule(pipe, 4))
    with pytest.raises(ValueError, match="not 3"):
        runner("a cat", latents=lat, output_type="latent")


def test_an_eager_runner_follows_a_dtype_change():
    """pipe.to(torch.bfloat16) after compiling ended in 'mat1 and mat2 must have the same dtype'."""
    pipe = tiny_sd_pipeline()
    sched = fitted_schedule(pipe, 3)
    runner = compile_olss_pipeline(pipe, sched, backend="eager")
    lat = noise((1, 4, 8, 8), 5)
    runner("a cat", latents=lat, output_type="latent")
    pipe.to(torch.bfloat16)
    got = runner("a cat", latents=lat, output_type="latent").images
    fresh = compile_olss_pipeline(pipe, sched, backend="eager", allow_mismatch=("model",))
    assert runner.dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    assert torch.equal(got, fresh("a cat", latents=lat, output_type="latent").images)


def test_the_onnxruntime_export_cache_is_bounded_and_an_export_on_a_call_warns(tmp_path, caplog):
    """Export folders piled up in the cache (11 after a short trial), each export on a call logged at INFO only."""
    pytest.importorskip("onnxruntime")
    pipe = tiny_sd_pipeline()
    sched = fitted_schedule(pipe, 2, guidance=2.0)
    fast = compile_olss_pipeline(pipe, sched, backend="onnxruntime", guidance_scale=2.0, cache_dir=str(tmp_path),
                                 export_cache_bytes=1, cache_size=1)
    lat = noise((1, 4, 8, 8), 6)
    with caplog.at_level(logging.WARNING):
        for g in (2.0, 3.0, 4.0):
            fast("a cat", latents=lat, guidance_scale=g, output_type="latent")
        fast("a cat", latents=lat, guidance_scale=4.0, output_type="latent")  # built already: no warning
    exports = [p for p in (tmp_path / "onnx").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(exports) == 1  # the bound keeps the one in use
    assert sum("exports the 2-step program to ONNX for a new input" in m for m in warnings_of(caplog)) == 3


# ================================================================================================ same seed, same image
def test_the_flux_runner_draws_its_noise_as_the_pipeline_does():
    """FluxPipeline and the Flux runner with the same generator differed by 6.1: the runner drew the noise in the
    packed shape, the pipeline draws it unpacked and packs it."""
    pipe = tiny_flux_pipeline()
    kw = dict(height=32, width=32, max_sequence_length=16)
    sched = fitted_schedule(pipe, 3, guidance=3.5, height=32, width=32)
    use_olss_scheduler(pipe, sched, guidance_scale=3.5, height=32, width=32)
    ref = pipe("a cat", num_inference_steps=3, guidance_scale=3.5, output_type="latent",
               generator=torch.Generator().manual_seed(0), **kw).images
    runner = compile_olss_pipeline(pipe, backend="eager", height=32, width=32)
    got = runner("a cat", guidance_scale=3.5, output_type="latent", generator=torch.Generator().manual_seed(0),
                 max_sequence_length=16).images
    assert_close_scaled(got, ref, 1e-5)


# ================================================================================================ the rest
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_refitting_a_pipeline_that_runs_an_olss_scheduler_works_quietly(caplog):
    """After the README's steps the pipeline holds an OLSSScheduler: re-fitting SD3 failed ('prediction_type given as
    flow must be one of epsilon ...') or recorded the OLSSScheduler itself as the teacher; SD printed diffusers'
    unused-keys warning. The teacher is the family's own (Euler / DPM-Solver++), built from the keys it takes."""
    records = _Records()
    diffusers_logger = logging.getLogger("diffusers")  # (diffusers' loggers do not propagate to caplog's root)
    diffusers_logger.addHandler(records)
    try:
        for make, kw, teacher in ((tiny_sd3_pipeline, {"max_sequence_length": 16}, "FlowMatchEulerDiscreteScheduler"),
                                  (tiny_sd_pipeline, {}, "DPMSolverMultistepScheduler")):
            pipe = make()
            first = fit_olss_scheduler(pipe, ["a cat", "a dog"], teacher_steps=8, num_steps=3, refine=False,
                                       progress=False, **kw)
            use_olss_scheduler(pipe, first.scheduler)
            records.messages.clear()
            with caplog.at_level(logging.WARNING):
                again = fit_olss_scheduler(pipe, ["a cat", "a dog"], teacher_steps=8, num_steps=3, refine=False,
                                           progress=False, **kw)
            assert again.stats.teacher.startswith(teacher + "(")
            assert again.schedules[3].timesteps == first.schedules[3].timesteps
            assert not [m for m in records.messages if "not expected" in m], records.messages
            assert warnings_of(caplog) == []
    finally:
        diffusers_logger.removeHandler(records)


def test_a_resolution_shift_outside_the_configured_range_warns(caplog):
    """A Flux fit at 1024² with a tiny pipeline's max_shift 1.15 computed mu = 11.55 and silently recorded timesteps
    crowded at 1000 (1000, 999.99, 999.98, 999.82): a shift beyond [base_shift, max_shift] warns."""
    pipe = tiny_flux_pipeline()
    cfg = pipe.scheduler.config
    with caplog.at_level(logging.WARNING):
        assert adapter_for(pipe).flow_mu(32, 32) <= cfg.max_shift  # the size the tiny pipeline is configured for
        assert warnings_of(caplog) == []
        mu = adapter_for(pipe).flow_mu(1024, 1024)
    assert mu > 10 * cfg.max_shift
    assert any("outside the scheduler's configured [base_shift, max_shift]" in m for m in warnings_of(caplog))


def test_the_recorded_negative_prompt_is_compared_where_the_schedule_runs(caplog):
    """The fitted call arguments were recorded (as a digest) but never compared: a schedule fitted with
    negative_prompt='blurry' ran with another one without a word."""
    pipe = tiny_sd_pipeline()
    res = fit_olss_scheduler(pipe, ["a cat", "a dog"], teacher_steps=8, num_steps=3, refine=False, progress=False,
                             negative_prompt="blurry", guidance_scale=7.5)
    assert res.schedules[3].fitted_for["call_kwargs"] == {"negative_prompt": "blurry"}
    runner = compile_olss_pipeline(pipe, res.scheduler, backend="eager", guidance_scale=7.5)
    lat = noise((1, 4, 8, 8), 7)
    with caplog.at_level(logging.WARNING):
        runner("a cat", negative_prompt="blurry", latents=lat, output_type="latent")
        assert warnings_of(caplog) == []
        runner("a cat", latents=lat, output_type="latent")
    assert any("call_kwargs = {'negative_prompt': 'blurry'} but runs at call_kwargs = {'negative_prompt': ''}" in m
               for m in warnings_of(caplog))


def test_the_flux_onnx_export_prints_nothing(tmp_path, capfd):
    """The TorchScript exporter printed ~400 lines of IR graph before the export fell back to dynamo=True."""
    pytest.importorskip("onnxruntime")
    from olss_fast.export import export_onnx

    pipe = tiny_flux_pipeline()
    sched = fitted_schedule(pipe, 2, guidance=3.5, height=32, width=32)
    capfd.readouterr()
    export_onnx(pipe, sched, tmp_path / "flux", height=32, width=32, guidance_scale=3.5,
                call_args={"max_sequence_length": 16})
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err and len((out + err).splitlines()) < 20


def test_demo_steps_without_five_pick_a_grid_step():
    from olss_fast.demo import DemoConfig

    config = DemoConfig(steps=(4, 6))
    config.validate()
    assert config.grid_nfe == 4
    np.testing.assert_array_equal(sorted(config.steps), [4, 6])
