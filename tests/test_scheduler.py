"""OLSSScheduler as a diffusers citizen.

Without a searched schedule for the requested step count it must *be* DDIMScheduler (tested the way diffusers tests
its schedulers: every config option, single steps at arbitrary timesteps in any order, eta > 0 with generators and
variance noise, clipping and thresholding, img2img starts, full loops, add_noise, save/load, fp16), compared with
DDIMScheduler itself. With a searched schedule it runs OLSS and refuses what OLSS cannot honour.
"""
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel

from olss_fast import OLSSSchedule, OLSSScheduler
from olss_fast.models.gmm import make_gmm
from olss_fast.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from helpers import ddim_config


_TRAINED = torch.linspace(1e-4, 0.03, 1000).tolist()
# every DDIMScheduler option, each value at least once
DDIM_CONFIGS = [
    dict(),
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction"),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=True, clip_sample_range=1.5),
    dict(trained_betas=_TRAINED, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True),
    dict(timestep_spacing="linspace", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.2, prediction_type="sample"),
    dict(clip_sample=True, clip_sample_range=0.8, timestep_spacing="leading", steps_offset=1),
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, thresholding=True, set_alpha_to_one=True,
         timestep_spacing="linspace"),
    dict(num_train_timesteps=500, rescale_betas_zero_snr=True, set_alpha_to_one=True, prediction_type="v_prediction"),
]


def pair(cfg):
    ddim = DDIMScheduler(**ddim_config(**cfg))
    return ddim, OLSSScheduler(**ddim.config)


def same(x, y):
    """Bitwise equal, NaN where DDIM itself gives NaN (e.g. eta > 0 at its last squaredcos timestep)."""
    torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def outputs_equal(a, b):
    assert type(a) is type(b)
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        same(a.prev_sample, b.prev_sample)
        same(a.pred_original_sample, b.pred_original_sample)


@pytest.mark.parametrize("cfg", DDIM_CONFIGS, ids=[f"cfg{i}" for i in range(len(DDIM_CONFIGS))])
def test_is_ddim_single_steps_at_arbitrary_timesteps(cfg):
    ddim, olss = pair(cfg)
    assert olss.config.clip_sample == ddim.config.clip_sample and olss.config.thresholding == ddim.config.thresholding
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert torch.equal(getattr(olss, name), getattr(ddim, name))
    assert torch.equal(torch.as_tensor(olss.final_alpha_cumprod), torch.as_tensor(ddim.final_alpha_cumprod))
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 25):
        ddim.set_timesteps(n)
        olss.set_timesteps(n)
        assert torch.equal(olss.timesteps, ddim.timesteps) and not olss.running_searched_schedule
        # any timestep, in any order (not only the schedule's), plain and tensor timesteps
        for t in torch.randint(0, ddim.config.num_train_timesteps, (6,), generator=g).tolist() + [
                int(ddim.timesteps[-1]), int(ddim.timesteps[0])]:
            x = torch.randn(2, 3, 4, 4, generator=g) * 3
            e = torch.randn(2, 3, 4, 4, generator=g)
            outputs_equal(olss.step(e, t, x), ddim.step(e, t, x))
            outputs_equal(olss.step(e, torch.tensor(t), x, 0.0, return_dict=False),
                          ddim.step(e, torch.tensor(t), x, 0.0, return_dict=False))
            # eta > 0 with equal generators, with given variance noise, with the clipped model output
            kw = dict(eta=0.7, generator=torch.Generator().manual_seed(t))
            outputs_equal(olss.step(e, t, x, **kw), ddim.step(e, t, x, **dict(kw, generator=torch.Generator().manual_seed(t))))
            vn = torch.randn(2, 3, 4, 4, generator=g)
            outputs_equal(olss.step(e, t, x, 1.0, True, None, vn), ddim.step(e, t, x, 1.0, True, None, vn))


@pytest.mark.parametrize("cfg", DDIM_CONFIGS, ids=[f"cfg{i}" for i in range(len(DDIM_CONFIGS))])
def test_is_ddim_full_loops_img2img_add_noise_and_fp16(cfg):
    ddim, olss = pair(cfg)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 4, 4, generator=g)
    for dtype in (torch.float32, torch.float16):
        for begin, eta in ((0, 0.0), (0, 0.3), (3, 0.0)):  # full loops, and an img2img-style late start
            outs = []
            for s in (ddim, olss):
                s.set_timesteps(8)
                if hasattr(s, "set_begin_index"):
                    s.set_begin_index(begin)
                x = x0.to(dtype)
                gen = torch.Generator().manual_seed(5)
                for t in s.timesteps[begin:]:
                    e = torch.sin(x.float() * 3 + t / 100).to(dtype)  # a deterministic stand-in for a model
                    x = s.step(e, t, x, eta=eta, generator=gen).prev_sample
                outs.append(x)
            assert outs[1].dtype == dtype
            same(outs[1], outs[0])  # (zero-SNR configs give NaN with eta > 0 in DDIM itself)
            assert eta > 0 or torch.isfinite(outs[0]).all()
    noise = torch.randn(2, 3, 4, 4, generator=g)
    ts = torch.tensor([17, ddim.config.num_train_timesteps - 1])
    assert torch.equal(olss.add_noise(x0, noise, ts), ddim.add_noise(x0, noise, ts))
    assert torch.equal(olss.get_velocity(x0, noise, ts), ddim.get_velocity(x0, noise, ts))
    assert len(olss) == len(ddim)


def test_is_ddim_after_save_and_load(tmp_path):
    ddim, olss = pair(DDIM_CONFIGS[2])
    olss.save_pretrained(tmp_path)
    loaded = OLSSScheduler.from_pretrained(tmp_path)
    for key in DDIMScheduler._get_init_keys(DDIMScheduler) - {"self"}:
        assert loaded.config[key] == ddim.config[key], key
    ddim.set_timesteps(5)
    loaded.set_timesteps(5)
    x, e = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    for t in ddim.timesteps:
        outputs_equal(loaded.step(e, t, x), ddim.step(e, t, x))
    # and from_config of a DDIM config, as a user swapping pipe.scheduler would do
    assert OLSSScheduler.from_config(ddim.config).config.clip_sample is True


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing, offset, alpha_one", [("trailing", 0, False), ("leading", 1, True), ("linspace", 0, False),
                                                        ("leading", 0, True)])
def test_ddim_schedule_in_olss_form_reproduces_ddim(prediction_type, spacing, offset, alpha_one):
    """ddim_schedule(n) (DDIM's coefficients written as an OLSS schedule, used by the compiled runner) runs as DDIM.

    Regression: the end of sampling detected by ``prev_timestep > 0`` instead of ``>= 0``. DDIMScheduler's own
    default (leading spacing, steps_offset=0, set_alpha_to_one=True) has a step that lands exactly on timestep 0,
    which must use ᾱ_0, not the final ᾱ (1.0): with that bug the ("leading", 0, True) case is ~2 % off DDIM."""
    cfg = ddim_config(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset,
                      set_alpha_to_one=alpha_one)
    pipe = make_gmm((3, 4, 4), seed=1)
    x0 = torch.randn(3, 3, 4, 4)
    n = 6
    pipe.scheduler = DDIMScheduler(**cfg)
    ref = pipe(prompt=3, latents=x0.clone(), num_inference_steps=n).sample
    sched = OLSSScheduler.from_config(DDIMScheduler(**cfg).config)
    pipe.scheduler = OLSSScheduler.from_schedules([sched.ddim_schedule(n)], config=DDIMScheduler(**cfg).config)
    got = pipe(prompt=3, latents=x0.clone(), num_inference_steps=n).sample
    assert pipe.scheduler.running_searched_schedule
    torch.testing.assert_close(got, ref, rtol=0, atol=float(ref.abs().max()) * 4e-6)


def test_reproduces_ddim_in_stable_diffusion_pipeline_fp32():
    pipe = tiny_sd_pipeline()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    base = pipe.scheduler
    ref = pipe("a red cat", num_inference_steps=5, latents=latents, output_type="latent", guidance_scale=4.0,
               eta=0.5, generator=torch.Generator().manual_seed(1)).images
    pipe.scheduler = OLSSScheduler.from_config(base.config)
    got = pipe("a red cat", num_inference_steps=5, latents=latents, output_type="latent", guidance_scale=4.0,
               eta=0.5, generator=torch.Generator().manual_seed(1)).images
    assert torch.equal(got, ref)


def _two_schedules(**cfg):
    c5 = torch.eye(5, 6, dtype=torch.float64)
    c3 = torch.eye(3, 4, dtype=torch.float64)
    s5 = OLSSSchedule([999, 799, 599, 399, 199], [0, 2, 4, 6, 8], c5, teacher_steps=10)
    s3 = OLSSSchedule([999, 666, 333], [0, 3, 6], c3, teacher_steps=10)
    return OLSSScheduler.from_schedules([s5, s3], config=ddim_config(**cfg))


def test_step_signature_is_ddims():
    sched = _two_schedules()
    sched.set_timesteps(3)
    x, e = torch.randn(1, 4), torch.randn(1, 4)
    out = sched.step(e, 999, x, 0.0)  # eta positionally, as DDIM takes it: still a SchedulerOutput
    assert hasattr(out, "prev_sample")
    with pytest.raises(ValueError, match="eta=1.0 asks for DDIM's stochastic sampling"):
        sched.step(e, 666, out.prev_sample, 1.0)
    with pytest.raises(ValueError, match="eta must be"):
        sched.step(e, 666, out.prev_sample, float("nan"))


def test_step_preserves_dtype_and_returns_tuple():
    sched = _two_schedules()
    sched.set_timesteps(3)
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    e = torch.randn_like(x)
    out = sched.step(e, sched.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and out[0].dtype == torch.bfloat16
    out2 = sched.step(e, sched.timesteps[1], out[0])
    assert out2.prev_sample.dtype == torch.bfloat16 and sched.step_index == 2


def test_searched_schedule_selection_fallback_and_errors(caplog):
    sched = _two_schedules()
    assert sched.available_steps == [3, 5]
    sched.set_timesteps(3)
    assert sched.timesteps.tolist() == [999, 666, 333] and sched.running_searched_schedule
    with caplog.at_level(logging.WARNING):
        sched.set_timesteps(4)  # no searched 4-step schedule: DDIM, announced once
        sched.set_timesteps(4)
    assert sum("not 4: running DDIMScheduler" in r.message for r in caplog.records) == 1
    assert not sched.running_searched_schedule and sched.timesteps.tolist() == [999, 749, 499, 249]
    for bad in (0, 3.9, True, "3"):
        with pytest.raises(ValueError, match="positive integer"):
            sched.set_timesteps(bad)
    with pytest.raises(ValueError, match="one schedule per step count"):
        OLSSScheduler.from_schedules([sched.schedules[3], sched.schedules[3]])
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match="must start at the first timestep"):
        sched.step(torch.zeros(1, 4), 666, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="not in this schedule"):
        sched.step(torch.zeros(1, 4), 123, torch.zeros(1, 4))
    out = sched.step(torch.zeros(1, 4), 999, torch.zeros(1, 4)).prev_sample
    with pytest.raises(ValueError, match="must follow scheduler.timesteps in order"):
        sched.step(torch.zeros(1, 4), 333, out)
    fresh = OLSSScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        fresh.step(torch.zeros(1, 4), 999, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="cannot start at step 2"):
        sched.set_begin_index(2)
    sched.set_timesteps(timesteps=[999, 799, 599, 399, 199])
    assert sched.num_inference_steps == 5 and sched.running_searched_schedule
    with pytest.raises(ValueError, match="cannot be honoured"):
        sched.set_timesteps(timesteps=[999, 700, 599, 399, 199])
    with pytest.raises(ValueError, match="custom timesteps need a searched schedule"):
        sched.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="sigmas are for flow-matching"):
        sched.set_timesteps(sigmas=[1.0, 0.5])


def test_edited_latents_between_steps_are_refused():
    sched = _two_schedules()
    x0 = torch.randn(2, 4)
    for edit in ("inplace", "new", "none", "cast"):
        sched.set_timesteps(3)
        x = sched.step(torch.randn(2, 4), 999, x0).prev_sample
        if edit == "inplace":
            x.mul_(0.5)  # a callback editing the latents in place
        elif edit == "new":
            x = 0.5 * x + 0.5 * torch.ones_like(x)  # an inpainting-style blend: a new tensor with other values
        elif edit == "cast":
            x = x.clone()  # a copy with the same values is not an edit
        if edit in ("inplace", "new"):
            with pytest.raises(ValueError, match="differ from those step 0 returned"):
                sched.step(torch.randn(2, 4), 666, x)
        else:
            x = sched.step(torch.randn(2, 4), 666, x).prev_sample
            sched.step(torch.randn(2, 4), 333, x)


def test_clip_and_threshold_configs_warn_once_with_a_searched_schedule(caplog):
    sched = _two_schedules(clip_sample=True)
    with caplog.at_level(logging.WARNING):
        sched.set_timesteps(3)
        sched.set_timesteps(3)
    assert sum("clip_sample=True in the scheduler config is not applied" in r.message for r in caplog.records) == 1


def test_step_applies_coefficients_exactly():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 4, generator=g, dtype=torch.float64).tril(1)
    sched = OLSSScheduler.from_schedules([OLSSSchedule([900, 500, 100], [0, 4, 8], c, teacher_steps=10)])
    sched.set_timesteps(3)
    x0 = torch.randn(2, 3, 5, generator=g)
    es = [torch.randn(2, 3, 5, generator=g) for _ in range(3)]
    x = x0
    for j, t in enumerate(sched.timesteps):
        x = sched.step(es[j], t, x).prev_sample
        ref = c[j, 0] * x0.double() + sum(c[j, l + 1] * es[l].double() for l in range(j + 1))
        torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-5)


def test_save_pretrained_round_trip(tmp_path):
    c = torch.randn(2, 2, 3, dtype=torch.float64).tril(1)  # per-channel schedule
    s = OLSSSchedule([800, 300], [0, 5], c, teacher_steps=10, errors=[0.1, 0.2], prediction_type="v_prediction")
    sched = OLSSScheduler.from_schedules([s], config=ddim_config(prediction_type="v_prediction"))
    sched.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["scheduler_config.json"]  # no temporary left behind
    loaded = OLSSScheduler.from_pretrained(tmp_path)
    assert loaded.config.prediction_type == "v_prediction"
    assert torch.equal(loaded.schedules[2].coeffs, c) and loaded.schedules[2].granularity == "channel"
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    cfg["schedules"][0]["coeffs"][0][0][0] = "x"
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="digest"):
        OLSSScheduler.from_pretrained(tmp_path)


def test_schedule_fitted_for_another_noise_schedule_or_parametrisation_is_refused():
    s = OLSSSchedule([800, 300], [0, 5], torch.eye(2, 3, dtype=torch.float64), teacher_steps=10,
                     fitted_for={"noise_schedule": OLSSScheduler(**ddim_config()).noise_schedule_id()})
    OLSSScheduler.from_schedules([s], config=ddim_config())  # the same noise schedule: fine
    with pytest.raises(ValueError, match="noise schedule: fitted for VP"):
        OLSSScheduler.from_schedules([s], config=ddim_config(beta_schedule="linear"))
    with pytest.raises(ValueError, match="prediction type"):
        OLSSScheduler.from_schedules([s], config=ddim_config(prediction_type="v_prediction"))
    # an explicit override is recorded in the scheduler's config and survives a round trip
    ok = OLSSScheduler.from_schedules([s], config=ddim_config(beta_schedule="linear"),
                                      allow_mismatch=("noise_schedule",))
    OLSSScheduler.from_config(ok.config)
    with pytest.raises(ValueError, match="allow_mismatch takes names"):
        OLSSScheduler.from_schedules([s], config=ddim_config(), allow_mismatch=("guidance",))


@pytest.mark.parametrize("key, value", [
    ("num_train_timesteps", 10**9), ("num_train_timesteps", 0), ("beta_start", float("nan")), ("beta_end", 2.0),
    ("beta_schedule", "cosine"), ("prediction_type", "x0"), ("timestep_spacing", "middle"), ("clip_sample", "no"),
    ("steps_offset", -1), ("trained_betas", [0.1, 0.2]), ("shift", float("inf")),
])
def test_bad_config_values_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        OLSSScheduler(**{key: value})


def test_flow_matching_scheduler_is_flow_match_euler_and_takes_sigmas_and_mu():
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    olss = OLSSScheduler.from_config(flow.config)
    assert olss.is_flow and olss.config.prediction_type == "flow"
    sig = np.linspace(1.0, 1 / 6, 6)
    for s in (flow, olss):
        s.set_timesteps(sigmas=sig, mu=0.8)
    assert torch.equal(olss.timesteps, flow.timesteps) and torch.equal(olss.sigmas, flow.sigmas)
    x, e = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    a, b = x, x
    for t in flow.timesteps:
        a = flow.step(e, t, a).prev_sample
        b = olss.step(e, t, b).prev_sample
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="mu"):
        olss.set_timesteps(6)  # dynamic shifting needs mu
    # a searched flow schedule: the pipeline's default sigma grid is accepted, custom sigmas are refused
    ts = [1000.0, 800.0, 500.0, 200.0]
    s = OLSSSchedule(ts, [0, 2, 5, 8], torch.eye(4, 5, dtype=torch.float64), teacher_steps=10,
                     prediction_type="flow", fitted_for={"mu": 0.8})
    searched = OLSSScheduler.from_schedules([s], config=flow.config)
    searched.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.8)
    assert searched.running_searched_schedule and searched.timesteps.tolist() == ts
    assert searched.sigmas.tolist() == pytest.approx([1.0, 0.8, 0.5, 0.2, 0.0], rel=1e-7)
    with pytest.raises(ValueError, match="custom sigmas"):
        searched.set_timesteps(sigmas=[1.0, 0.9, 0.4, 0.1], mu=0.8)


def test_ddpm_pipeline_style_loop():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    ddim = DDIMScheduler(clip_sample=True, timestep_spacing="trailing")
    pipe = DDPMPipeline(unet=unet, scheduler=ddim)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np").images
    pipe.scheduler = OLSSScheduler.from_config(ddim.config)
    got = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert got.shape == (2, 8, 8, 1)
    assert np.array_equal(got, ref)


def test_sdxl_pipeline_runs_with_olss_and_matches_ddim():
    pipe = tiny_sdxl_pipeline()
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=4, height=16, width=16, latents=lat, output_type="latent", guidance_scale=3.0)
    ref = pipe("a dog", **kw).images
    pipe.scheduler = OLSSScheduler.from_config(pipe.scheduler.config)
    got = pipe("a dog", **kw).images
    assert torch.equal(got, ref)
