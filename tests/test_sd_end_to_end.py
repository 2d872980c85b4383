"""A tiny random StableDiffusionPipeline: search on its own trajectories, run, save/load, CLI."""
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from olss_fast import OLSSScheduler, fit_olss_scheduler
from olss_fast.cli import main
from olss_fast.testing import tiny_sd_pipeline

PROMPTS = ["a red cat", "blue sky", "a dog", "green car"]


@pytest.fixture(scope="module")
def fitted():
    pipe = tiny_sd_pipeline(prediction_type="v_prediction")
    res = fit_olss_scheduler(pipe, PROMPTS, teacher_steps=12, num_steps=(3, 4), batch_size=4, guidance_scale=3.0,
                             progress=False)
    return pipe, res


def test_pipeline_runs_with_searched_scheduler_and_from_saved_folder(fitted, tmp_path, caplog):
    pipe, res = fitted
    assert sorted(res.schedules) == [3, 4] and all(s.refined for s in res.schedules.values())
    assert res.stats.num_samples == 4 and res.stats.sample_shape == (4, 8, 8)
    assert res.schedules[4].prediction_type == "v_prediction"
    pipe.scheduler = res.scheduler
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    kw = dict(num_inference_steps=4, latents=lat, guidance_scale=3.0, output_type="np")
    a = pipe("a bird", **kw).images
    assert a.shape == (1, 16, 16, 3) and np.isfinite(a).all()
    res.scheduler.save_pretrained(tmp_path / "sched")
    pipe.scheduler = OLSSScheduler.from_pretrained(tmp_path / "sched")
    b = pipe("a bird", **kw).images
    np.testing.assert_array_equal(a, b)
    # a step count without a searched schedule runs DDIM on the same noise schedule, and says so once
    with caplog.at_level(logging.WARNING):
        c = pipe("a bird", **dict(kw, num_inference_steps=7)).images
    assert sum("not 7: running DDIMScheduler" in r.message for r in caplog.records) == 1
    ddim = pipe.scheduler._fallback
    pipe.scheduler = DDIMScheduler.from_config(ddim.config)
    np.testing.assert_array_equal(c, pipe("a bird", **dict(kw, num_inference_steps=7)).images)


def test_refined_student_is_closer_to_teacher_than_ddim_on_training_prompts(fitted):
    pipe, res = fitted
    from olss_fast.evaluate import baseline_scheduler, rmse, sample
    from olss_fast.recording import item_noise, make_work_items

    cfg = dict(res.scheduler.config)
    x0 = item_noise(make_work_items(PROMPTS), (4, 8, 8))
    kw = {"guidance_scale": 3.0}
    teacher = sample(pipe, baseline_scheduler("ddim", cfg), PROMPTS, x0, 12, kw)
    ours = rmse(sample(pipe, res.scheduler, PROMPTS, x0, 4, kw), teacher)
    ddim = rmse(sample(pipe, baseline_scheduler("ddim", cfg), PROMPTS, x0, 4, kw), teacher)
    assert ours < ddim


def test_cli_search_writes_a_loadable_scheduler(tmp_path, capsys):
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a cat\n# comment\n\na dog\n")
    out = tmp_path / "out"
    rc = main(["search", "--pipeline", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt"),
               "--out", str(out), "--teacher-steps", "8", "--steps", "2", "3", "--batch-size", "2", "--quiet",
               "--guidance-scale", "2.0"])
    assert rc == 0
    sched = OLSSScheduler.from_pretrained(out / "scheduler")
    assert sched.available_steps == [2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 2
    assert (out / "stats.safetensors").is_file() and (out / "schedule_3.json").is_file()
    # a non-empty output folder is refused without --force, with a clear message and exit code 2
    rc = main(["search", "--pipeline", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt"),
               "--out", str(out), "--quiet"])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    rc = main(["search", "--pipeline", str(tmp_path / "nothing"), "--prompts", str(tmp_path / "prompts.txt"),
               "--out", str(tmp_path / "o2"), "--quiet"])
    assert rc == 2 and not (tmp_path / "o2").exists()
