"""OLSSScheduler as a diffusers citizen: DDIM reproduction, pipelines, save/load, errors."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

from olss_fast import OLSSSchedule, OLSSScheduler
from olss_fast.models.gmm import make_gmm
from olss_fast.testing import tiny_sd_pipeline, tiny_sdxl_pipeline


def ddim_config(**kw):
    cfg = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing, offset, alpha_one", [("trailing", 0, False), ("leading", 1, True), ("linspace", 0, False)])
@pytest.mark.parametrize("n", [1, 4, 10])
def test_without_search_reproduces_ddim(prediction_type, spacing, offset, alpha_one, n):
    cfg = ddim_config(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset,
                      set_alpha_to_one=alpha_one)
    pipe = make_gmm((3, 4, 4), seed=1)
    x0 = torch.randn(3, 3, 4, 4)
    outs = []
    for sched in (DDIMScheduler(**cfg), OLSSScheduler.from_config(DDIMScheduler(**cfg).config)):
        pipe.scheduler = sched
        outs.append(pipe(prompt=3, latents=x0.clone(), num_inference_steps=n).sample)
    assert torch.equal(pipe.scheduler.timesteps.cpu(), _ddim_ts(cfg, n))
    scale = outs[0].abs().max()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=float(scale) * 4e-6)


def _ddim_ts(cfg, n):
    d = DDIMScheduler(**cfg)
    d.set_timesteps(n)
    return d.timesteps


def test_reproduces_ddim_in_stable_diffusion_pipeline_fp32():
    pipe = tiny_sd_pipeline()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    base = pipe.scheduler
    ref = pipe("a red cat", num_inference_steps=5, latents=latents, output_type="latent", guidance_scale=4.0).images
    pipe.scheduler = OLSSScheduler.from_config(base.config)
    got = pipe("a red cat", num_inference_steps=5, latents=latents, output_type="latent", guidance_scale=4.0).images
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_step_preserves_dtype_and_returns_tuple():
    s = OLSSScheduler()
    s.set_timesteps(3)
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    e = torch.randn_like(x)
    out = s.step(e, s.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and out[0].dtype == torch.bfloat16
    out2 = s.step(e, s.timesteps[1], out[0])
    assert out2.prev_sample.dtype == torch.bfloat16 and s.step_index == 2


def test_searched_schedule_selection_and_errors():
    c5 = torch.eye(5, 6, dtype=torch.float64)
    c3 = torch.eye(3, 4, dtype=torch.float64)
    s5 = OLSSSchedule([999, 799, 599, 399, 199], [0, 2, 4, 6, 8], c5, teacher_steps=10)
    s3 = OLSSSchedule([999, 666, 333], [0, 3, 6], c3, teacher_steps=10)
    sched = OLSSScheduler.from_schedules([s5, s3], config=ddim_config())
    assert sched.available_steps == [3, 5]
    sched.set_timesteps(3)
    assert sched.timesteps.tolist() == [999, 666, 333]
    with pytest.raises(ValueError, match=r"holds schedules for \[3, 5\] steps, not 4"):
        sched.set_timesteps(4)
    with pytest.raises(ValueError, match="positive integer"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="one schedule per step count"):
        OLSSScheduler.from_schedules([s3, s3])
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match="must start at the first timestep"):
        sched.step(torch.zeros(1, 4), 666, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="not in this schedule"):
        sched.step(torch.zeros(1, 4), 123, torch.zeros(1, 4))
    fresh = OLSSScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        fresh.step(torch.zeros(1, 4), 999, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="not supported"):
        sched.set_begin_index(2)
    sched.set_timesteps(timesteps=[999, 799, 599, 399, 199])
    assert sched.num_inference_steps == 5


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
    s = OLSSSchedule([800, 300], [0, 5], c, teacher_steps=10, errors=[0.1, 0.2])
    sched = OLSSScheduler.from_schedules([s], config=ddim_config(prediction_type="v_prediction"))
    sched.save_pretrained(tmp_path)
    loaded = OLSSScheduler.from_pretrained(tmp_path)
    assert loaded.config.prediction_type == "v_prediction"
    assert torch.equal(loaded.schedules[2].coeffs, c) and loaded.schedules[2].granularity == "channel"
    # a corrupted schedule inside the config is refused on load
    import json

    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    cfg["schedules"][0]["coeffs"][0][0][0] = "x"
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="coeffs"):
        OLSSScheduler.from_pretrained(tmp_path)


def test_add_noise_matches_ddim():
    cfg = ddim_config()
    x, n, t = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([10, 500, 999])
    torch.testing.assert_close(OLSSScheduler.from_config(DDIMScheduler(**cfg).config).add_noise(x, n, t),
                               DDIMScheduler(**cfg).add_noise(x, n, t))


def test_ddpm_pipeline_style_loop():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    ddim = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    pipe = DDPMPipeline(unet=unet, scheduler=ddim)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np").images
    pipe.scheduler = OLSSScheduler.from_config(ddim.config)
    got = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert got.shape == (2, 8, 8, 1)
    assert abs(got - ref).max() < 1e-4


def test_sdxl_pipeline_runs_with_olss_and_matches_ddim():
    pipe = tiny_sdxl_pipeline()
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=4, height=16, width=16, latents=lat, output_type="latent", guidance_scale=3.0)
    ref = pipe("a dog", **kw).images
    pipe.scheduler = OLSSScheduler.from_config(pipe.scheduler.config)
    got = pipe("a dog", **kw).images
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
