"""fit_olss_scheduler's front end: prompt and option forms, pass-through call arguments, refused pipelines, what given
statistics were recorded for, and the provenance every schedule carries."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

from olss_fast import GramStats, OLSSScheduler, fit_olss_scheduler, search_schedule
from olss_fast.models.gmm import make_gmm
from olss_fast.fit.config import RecordConfig
from olss_fast.fit.recording import record_trajectories
from olss_fast.testing import tiny_sd_pipeline

FIT = dict(teacher_steps=8, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


def test_a_string_is_one_prompt_and_num_steps_may_be_an_int(sd):
    res = fit_olss_scheduler(sd, "a cat", num_steps=3, guidance_scale=2.0, **FIT)
    assert res.stats.num_samples == 1 and sorted(res.schedules) == [3]
    assert res.scheduler.available_steps == [3]


def test_pipeline_call_arguments_pass_through_and_change_the_recording(sd, monkeypatch):
    seen = []
    original = type(sd).__call__

    def spy(self, prompt=None, latents=None, negative_prompt=None, **kwargs):
        seen.extend(negative_prompt)  # one per prompt of the batch
        return original(self, prompt=prompt, latents=latents, negative_prompt=negative_prompt, **kwargs)

    monkeypatch.setattr(type(sd), "__call__", spy)
    a = fit_olss_scheduler(sd, ["a cat", "a dog"], num_steps=(2,), guidance_scale=3.0, negative_prompt="blurry",
                           refine=False, **FIT)
    assert seen and set(seen) == {"blurry"}
    monkeypatch.setattr(type(sd), "__call__", original)
    b = fit_olss_scheduler(sd, ["a cat", "a dog"], num_steps=(2,), guidance_scale=3.0, refine=False, **FIT)
    assert not torch.equal(a.stats.gram, b.stats.gram)  # the negative prompt took effect
    assert a.schedules[2].fitted_for["call_kwargs_sha256"] != b.schedules[2].fitted_for["call_kwargs_sha256"]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['negative_prompts'\]"):
        fit_olss_scheduler(sd, "a cat", num_steps=2, negative_prompts="x", **FIT)
    with pytest.raises(ValueError, match="set by the recording itself"):
        fit_olss_scheduler(sd, "a cat", num_steps=2, call_kwargs={"latents": None}, **FIT)
    with pytest.raises(ValueError, match="not both"):
        fit_olss_scheduler(sd, "a cat", record=RecordConfig(teacher_steps=8), teacher_steps=8, progress=False)


@pytest.mark.parametrize("kw, match", [
    (dict(teacher_steps=0), "teacher_steps"), (dict(teacher_steps=3.9), "teacher_steps"),
    (dict(batch_size=0), "batch_size"), (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(num_steps=()), "empty"), (dict(num_steps=(2, 2)), "duplicates"), (dict(num_steps=2.5), "num_steps"),
    (dict(path="best"), "path"), (dict(refine="false"), "refine"), (dict(refine_samples=0), "refine_samples"),
])
def test_bad_options_are_refused_before_any_work(sd, kw, match):
    with pytest.raises(ValueError, match=match):
        fit_olss_scheduler(sd, "a cat", **dict(dict(FIT, num_steps=2), **kw))


def test_unconditional_pipelines_are_refused_up_front():
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="DDPMPipeline.__call__ takes no `prompt` and no `latents`"):
        fit_olss_scheduler(pipe, [None, None], num_steps=2, **FIT)
    with pytest.raises(ValueError, match="Unconditional pipelines"):
        record_trajectories(pipe, [None], teacher_steps=4, progress=False)
    assert not calls  # refused before the model ran


def test_schedules_record_what_they_were_fitted_for(sd):
    res = fit_olss_scheduler(sd, ["a cat", "a dog"], num_steps=2, guidance_scale=2.5, **FIT)
    f = res.schedules[2].fitted_for
    assert f["model"]["class"] == "UNet2DConditionModel" and len(f["model"]["weights_sha256"]) == 64
    assert f["noise_schedule"] == OLSSScheduler.from_config(sd.scheduler.config).noise_schedule_id()
    assert f["guidance_scale"] == 2.5 and f["latent_shape"] == [4, 8, 8] and f["num_samples"] == 2
    assert f["teacher"]["class"] == "DPMSolverMultistepScheduler" and f["teacher"]["steps"] == 8  # the default
    assert res.stats.context["prompts_sha256"] == f["prompts_sha256"]
    assert res.schedules[2].prediction_type == "epsilon"
    # a v-prediction model labels its statistics and schedules so
    v = fit_olss_scheduler(tiny_sd_pipeline(prediction_type="v_prediction"), "a cat", num_steps=2, refine=False,
                           guidance_scale=2.0, **FIT)
    assert v.stats.prediction_type == v.schedules[2].prediction_type == "v_prediction"


def test_given_statistics_refuse_another_guidance_or_model_for_the_re_fit(sd):
    res = fit_olss_scheduler(sd, ["a cat", "a dog"], num_steps=2, guidance_scale=2.5, refine=False, **FIT)
    # re-search and re-fit at the recorded guidance (taken from the statistics when left out)
    again = fit_olss_scheduler(sd, ["a cat", "a dog"], stats=res.stats, num_steps=3, **FIT)
    assert again.schedules[3].refined
    with pytest.raises(ValueError, match=r"guidance scale: fitted for 2.5, used with 7.0"):
        fit_olss_scheduler(sd, ["a cat"], stats=res.stats, num_steps=3, guidance_scale=7.0, **FIT)
    with pytest.raises(ValueError, match="has no effect on a search of finished statistics"):
        fit_olss_scheduler(None, [], stats=res.stats, num_steps=3, guidance_scale=7.0, refine=False, **FIT)
    other = tiny_sd_pipeline(seed=1)
    with pytest.raises(ValueError, match="model: "):
        fit_olss_scheduler(other, ["a cat"], stats=res.stats, num_steps=3, **FIT)


def test_gram_stats_need_a_prediction_type():
    with pytest.raises(ValueError, match="prediction_type="):
        GramStats([3, 2, 1])
    stats = GramStats([999, 500, 1], teacher=DDIMScheduler(prediction_type="v_prediction"))
    assert stats.prediction_type == "v_prediction" and stats.teacher.startswith("DDIMScheduler(")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        GramStats([3, 2, 1], prediction_type="eps")


def test_search_options_have_one_way_in():
    from olss_fast.core.search import SearchConfig

    pipe = make_gmm((2, 3, 3), seed=0)
    stats = record_trajectories(pipe, [None] * 8, teacher_steps=20, batch_size=8, progress=False)
    a = search_schedule(stats, 4, config=SearchConfig(path="minimax"))
    b = search_schedule(stats, 4, path="minimax")
    assert a.indices == b.indices
    with pytest.raises(ValueError, match="not both"):
        search_schedule(stats, 4, path="minimax", config=SearchConfig())
    with pytest.raises(ValueError, match="not both"):
        search_schedule(stats, 4, granularity="channel", config=SearchConfig())
