"""compile_olss_pipeline as a careful diffusers component: schedule sources, what a schedule was fitted for, a runner
that follows its pipeline (reassigned modules, weights changed in place), and the call arguments production users rely
on (callback_on_step_end, cross_attention_kwargs' LoRA scale, guidance_rescale, clip_skip)."""
from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from olss_fast import OLSSScheduler, compile_olss_pipeline
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from helpers import assert_close_scaled, perturbed

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = ["a cat", "blue sky"]


def ddim_schedule(pipe: Any, n: int, **fitted_for: Any) -> OLSSSchedule:
    s = OLSSScheduler.from_config(pipe.scheduler.config).ddim_schedule(n)
    return OLSSSchedule(timesteps=s.timesteps, indices=s.indices, coeffs=s.coeffs, teacher_steps=s.teacher_steps,
                        prediction_type=s.prediction_type, path="ddim", fitted_for=dict(s.fitted_for, **fitted_for))


def olss_pipe(pipe: Any, schedule: OLSSSchedule) -> Any:
    pipe.scheduler = OLSSScheduler.from_schedules([schedule], config=pipe.scheduler.config)
    return pipe


def noise(shape: tuple, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ================================================================================================ schedule sources
def test_schedule_from_a_folder_or_a_json_and_the_choice_rules(tmp_path):
    pipe = tiny_sd_pipeline()
    s3, s4 = perturbed(ddim_schedule(pipe, 3), seed=1), perturbed(ddim_schedule(pipe, 4), seed=2)
    s3.save(tmp_path / "s3.json")
    one = OLSSScheduler.from_schedules([s3], config=pipe.scheduler.config)
    one.save_pretrained(tmp_path / "one")
    two = OLSSScheduler.from_schedules([s3, s4], config=pipe.scheduler.config)
    two.save_pretrained(tmp_path / "two")
    for source in (tmp_path / "s3.json", str(tmp_path / "one"), tmp_path / "one" / "scheduler_config.json"):
        runner = compile_olss_pipeline(pipe, source, backend="eager")  # one schedule: no num_inference_steps needed
        assert runner.num_inference_steps == 3 and torch.equal(runner.schedule.coeffs, s3.coeffs)
    assert compile_olss_pipeline(pipe, tmp_path / "two", num_inference_steps=4).num_inference_steps == 4
    # the choice never depends on what the pipeline ran last: two schedules and no step count is an error
    pipe.scheduler = two
    pipe(PROMPT[0], num_inference_steps=3, output_type="latent")
    with pytest.raises(ValueError, match=r"holds searched schedules for \[3, 4\] steps; choose one with "
                                         r"num_inference_steps=3 \(or another of \[3, 4\]\)"):
        compile_olss_pipeline(pipe, None)
    with pytest.raises(ValueError, match="does not exist"):
        compile_olss_pipeline(pipe, tmp_path / "missing.json")
    with pytest.raises(ValueError, match="not both"):
        from olss_fast.serve.config import RuntimeConfig

        compile_olss_pipeline(pipe, s3, config=RuntimeConfig(), backend="eager")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['guidance'\]"):
        compile_olss_pipeline(pipe, s3, guidance=2.0)


# ================================================================================================ fitted for
def test_a_schedule_is_checked_against_the_pipeline_it_runs_on(caplog):
    from olss_fast.core.fingerprint import model_id

    sd = tiny_sd_pipeline()
    other_model = {"class": "UNet2DModel", "config_sha256": "0" * 64, "weights_sha256": "1" * 64}
    foreign = ddim_schedule(sd, 3, model=other_model)
    with pytest.raises(ValueError, match="model: fitted for UNet2DModel"):
        compile_olss_pipeline(sd, foreign, backend="eager")
    compile_olss_pipeline(sd, foreign, backend="eager", allow_mismatch=("model",))  # explicit override
    # the same architecture with other weights (a fine-tune): one warning, runs
    same_arch = dict(model_id(sd.unet), weights_sha256="2" * 64)
    with caplog.at_level(logging.WARNING):
        compile_olss_pipeline(sd, ddim_schedule(sd, 3, model=same_arch), backend="eager")
    assert any("fitted on other weights of the same UNet2DConditionModel" in r.message for r in caplog.records)
    # another guidance scale or size than fitted for: one warning each, at compile time and per call
    caplog.clear()
    fitted = ddim_schedule(sd, 3, model=model_id(sd.unet), guidance_scale=7.5, latent_shape=[4, 8, 8])
    with caplog.at_level(logging.WARNING):
        runner = compile_olss_pipeline(sd, fitted, backend="eager", guidance_scale=2.0)
        runner(PROMPT[0], output_type="latent", height=32, width=32)
    messages = [r.message for r in caplog.records]
    assert any("fitted at guidance_scale = 7.5 but runs at guidance_scale = 2.0" in m for m in messages)
    assert any("latent_shape = [4, 8, 8]" in m and "[4, 16, 16]" in m for m in messages)
    # an export checks too
    from olss_fast.export.plan import plan_export

    with pytest.raises(ValueError, match="model: fitted for UNet2DModel"):
        plan_export(sd, foreign)


# ================================================================================================ follows the pipeline
def test_eager_runner_follows_reassigned_modules_and_in_place_weights():
    pipe = tiny_sd_pipeline()
    sched = perturbed(ddim_schedule(pipe, 3), seed=3)
    runner = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=3.0)
    lat = noise((1, 4, 8, 8), 0)
    before = runner(PROMPT[0], latents=lat, output_type="latent").images
    # a fused LoRA changes weights in place through .data (invisible to autograd's version counters)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.data += 0.01 * torch.randn_like(p)
    after = runner(PROMPT[0], latents=lat, output_type="latent").images
    olss_pipe(pipe, sched)
    ref = pipe(PROMPT[0], num_inference_steps=3, guidance_scale=3.0, latents=lat, output_type="latent").images
    assert_close_scaled(after, ref, 1e-5)
    assert (after - before).abs().max() > 1e-3
    # a reassigned component
    pipe.unet = tiny_sd_pipeline(seed=7).unet
    got = runner(PROMPT[0], latents=lat, output_type="latent").images
    ref = pipe(PROMPT[0], num_inference_steps=3, guidance_scale=3.0, latents=lat, output_type="latent").images
    assert_close_scaled(got, ref, 1e-5)


def test_captured_programs_are_rebuilt_when_the_modules_change(monkeypatch):
    """CPU stand-in for CUDA graphs (as in test_runtime): a reassigned module or new parameter tensors re-capture."""
    from test_runtime import _FakeCapture, _fake_graph_runner

    pipe = tiny_sd_pipeline()
    sched = perturbed(ddim_schedule(pipe, 3), seed=4)
    graphed = _fake_graph_runner(pipe, sched, monkeypatch)
    lat = noise((1, 4, 8, 8), 1)
    graphed(PROMPT[0], latents=lat, output_type="latent")
    graphed(PROMPT[0], latents=lat, output_type="latent")
    assert _FakeCapture.captures == 1
    pipe.vae = tiny_sd_pipeline(seed=3).vae
    graphed(PROMPT[0], latents=lat, output_type="latent")
    assert _FakeCapture.captures == 2
    layer = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear))
    layer.weight.data = layer.weight.data.clone() * 1.01  # a safe-merged LoRA: new tensors
    out = graphed(PROMPT[0], latents=lat, output_type="latent").images
    assert _FakeCapture.captures == 3
    eager = compile_olss_pipeline(pipe, sched, backend="eager")
    assert_close_scaled(out, eager(PROMPT[0], latents=lat, output_type="latent").images, 1e-6)


def test_onnx_backend_re_exports_stale_weights_and_bounds_its_cache(tmp_path):
    pytest.importorskip("onnxruntime")
    pipe = tiny_sd_pipeline()
    sched = perturbed(ddim_schedule(pipe, 2), seed=5)
    fast = compile_olss_pipeline(pipe, sched, backend="onnxruntime", guidance_scale=2.0, cache_dir=str(tmp_path),
                                 cache_size=1)
    lat = noise((1, 4, 8, 8), 2)
    fast(PROMPT[0], latents=lat, output_type="latent")
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.data *= 1.02  # in place through .data
    got = fast(PROMPT[0], latents=lat, output_type="latent").images
    eager = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=2.0)
    assert_close_scaled(got, eager(PROMPT[0], latents=lat, output_type="latent").images, 1e-5)
    info = fast.cache_info()
    assert info["num_exports"] == 2
    fast(PROMPT[0], latents=lat, guidance_scale=3.0, output_type="latent")  # another guidance: another export
    info = fast.cache_info()
    assert info["size"] == 1 and info["evictions"] >= 1 and info["num_exports"] == 3
    with pytest.raises(ValueError, match="not supported by the onnxruntime backend"):
        fast(PROMPT[0], latents=lat, clip_skip=1)


# ================================================================================================ call arguments
def _sd_clip_skip_embeds(pipe: Any, prompts: list, negative: Any, clip_skip: int) -> dict:
    """StableDiffusionPipeline.encode_prompt's clip_skip, written out (diffusers 0.42 reads
    ``text_encoder.text_model``, which transformers 5 removed): prompts from hidden layer -(k+1) + the final layer
    norm, negatives from the last layer."""
    te = pipe.text_encoder

    def ids(texts: list) -> torch.Tensor:
        return pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    with torch.no_grad():
        hidden = te(ids(prompts), output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        pos = getattr(te, "text_model", te).final_layer_norm(hidden)  # transformers 4 nests it, 5 does not
        neg = te(ids([negative or ""] * len(prompts)))[0]
    return dict(prompt_embeds=pos, negative_prompt_embeds=neg)


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_clip_skip_and_guidance_rescale_match_diffusers(make):
    pipe = make()
    sched = perturbed(ddim_schedule(pipe, 3), seed=6)
    runner = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=4.0)
    sdxl = make is tiny_sdxl_pipeline
    size = dict(height=16, width=16) if sdxl else {}
    lat = noise((2, 4, 8, 8), 3)
    olss_pipe(pipe, sched)
    for kw in (dict(clip_skip=1), dict(guidance_rescale=0.7), dict(clip_skip=1, guidance_rescale=0.3,
                                                                  negative_prompt="dark")):
        if "clip_skip" in kw and not sdxl:
            ref_kw = dict(_sd_clip_skip_embeds(pipe, PROMPT, kw.get("negative_prompt"), kw["clip_skip"]),
                          guidance_rescale=kw.get("guidance_rescale", 0.0))
            ref = pipe(num_inference_steps=3, guidance_scale=4.0, latents=lat, output_type="latent", **ref_kw).images
        else:
            ref = pipe(PROMPT, num_inference_steps=3, guidance_scale=4.0, latents=lat, output_type="latent",
                       **size, **kw).images
        got = runner(PROMPT, latents=lat, output_type="latent", **size, **kw).images
        assert_close_scaled(got, ref, 2e-5, what=str(kw))
        plain = runner(PROMPT, latents=lat, output_type="latent", **size).images
        assert (got - plain).abs().max() > 1e-4, kw  # the option took effect
    with pytest.raises(ValueError, match="guidance_rescale must be in"):
        runner(PROMPT, guidance_rescale=1.5)
    with pytest.raises(ValueError, match="clip_skip must be"):
        runner(PROMPT, clip_skip=-1)


def test_lora_scale_matches_diffusers():
    peft = pytest.importorskip("peft")
    pipe = tiny_sd_pipeline()
    pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                          init_lora_weights=False))
    sched = perturbed(ddim_schedule(pipe, 3), seed=7)
    runner = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=3.0, allow_mismatch=("model",))
    lat = noise((1, 4, 8, 8), 4)
    olss_pipe(pipe, sched)
    outs = []
    for scale in (0.0, 0.5):
        kw = dict(cross_attention_kwargs={"scale": scale})
        ref = pipe(PROMPT[0], num_inference_steps=3, guidance_scale=3.0, latents=lat, output_type="latent",
                   **kw).images
        got = runner(PROMPT[0], latents=lat, output_type="latent", **kw).images
        assert_close_scaled(got, ref, 2e-5, what=f"LoRA scale {scale}")
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="may only hold the LoRA scale"):
        runner(PROMPT[0], cross_attention_kwargs={"ip_adapter_masks": None})


def test_callback_on_step_end_reads_latents_and_may_not_edit_them():
    pipe = tiny_sd_pipeline()
    sched = perturbed(ddim_schedule(pipe, 3), seed=8)
    runner = compile_olss_pipeline(pipe, sched, backend="eager", guidance_scale=3.0)
    lat = noise((1, 4, 8, 8), 5)
    seen: list[tuple[int, int, torch.Tensor]] = []

    def spy(p: Any, i: int, t: Any, kw: dict) -> dict:
        seen.append((i, int(t), kw["latents"].clone()))
        return kw

    out = runner(PROMPT[0], latents=lat, output_type="latent", callback_on_step_end=spy).images
    assert [(i, t) for i, t, _ in seen] == list(enumerate(sched.timesteps))
    assert torch.equal(seen[-1][2], out)
    # diffusers' own loop shows the callback the same latents
    olss_pipe(pipe, sched)
    ref: list[torch.Tensor] = []
    pipe(PROMPT[0], num_inference_steps=3, guidance_scale=3.0, latents=lat, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: ref.append(kw["latents"].clone()) or kw)
    for (_, _, a), b in zip(seen, ref):
        assert_close_scaled(a, b, 1e-5)

    def editor(p: Any, i: int, t: Any, kw: dict) -> dict:
        return {"latents": kw["latents"] * 0.5}

    with pytest.raises(ValueError, match=r"changed \['latents'\]"):
        runner(PROMPT[0], latents=lat, callback_on_step_end=editor)
    with pytest.raises(ValueError, match="not available"):
        runner(PROMPT[0], latents=lat, callback_on_step_end=spy, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_a_digits_schedule_is_refused_on_a_stable_diffusion_pipeline(tmp_path):
    """A schedule fitted on another model family does not silently compile or export onto a pipeline."""
    from test_runtime import make_digits_pipe

    from olss_fast import fit_olss_scheduler
    from olss_fast.export.onnx_export import export_onnx

    digits = make_digits_pipe()
    res = fit_olss_scheduler(digits, [1, 2, 3, 4], teacher_steps=6, num_steps=2, batch_size=4, refine=False,
                             guidance_scale=2.0, progress=False)
    sd = tiny_sd_pipeline()
    with pytest.raises(ValueError, match=r"model: fitted for UNet2DModel .* used with UNet2DConditionModel"):
        compile_olss_pipeline(sd, res.schedules[2], backend="eager")
    with pytest.raises(ValueError, match="model: fitted for UNet2DModel"):
        export_onnx(sd, res.schedules[2], tmp_path / "x")
    assert not (tmp_path / "x").exists()
