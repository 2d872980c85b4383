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
    from olss_fast.core.metrics import rmse
    from olss_fast.fit.baselines import baseline_scheduler, sample
    from olss_fast.fit.work import item_noise, make_work_items

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
    assert summary["samples"] == 3  # every non-empty line is a prompt, one starting with '#' too
    assert (out / "stats.safetensors").is_file() and (out / "schedule_3.json").is_file()
    # a non-empty output folder is refused without --force, with a clear message and exit code 2
    rc = main(["search", "--pipeline", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt"),
               "--out", str(out), "--quiet"])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    rc = main(["search", "--pipeline", str(tmp_path / "nothing"), "--prompts", str(tmp_path / "prompts.txt"),
               "--out", str(tmp_path / "o2"), "--quiet"])
    assert rc == 2 and not (tmp_path / "o2").exists()


def _all_actions(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)
        else:
            yield parser.prog, action


def test_cli_every_option_has_help_and_there_is_a_version(capsys):
    from olss_fast import __version__
    from olss_fast.cli import build_parser

    missing = [f"{prog} {a.option_strings}" for prog, a in _all_actions(build_parser())
               if a.option_strings and not a.help]
    assert missing == []
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"olss-fast {__version__}"


def test_cli_bad_values_and_devices_give_one_line_naming_the_flag(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    base = ["search", "--pipeline", "digits", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]
    for flag, value in (("--teacher-steps", "0"), ("--guidance-scale", "nan"), ("--steps", "2.5"),
                        ("--batch-size", "-1")):
        with pytest.raises(SystemExit) as exc:
            main(base + [flag, value])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and flag in err and "Traceback" not in err
    if not torch.cuda.is_available():
        assert main(base + ["--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--device cuda: no CUDA device is available" in err
    assert main(base + ["--device", "tpu9"]) == 2 and "--device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_library_errors_name_cli_flags(tmp_path, capsys):
    pipe = tiny_sd_pipeline()
    res = fit_olss_scheduler(pipe, ["a cat", "a dog"], teacher_steps=6, num_steps=(2,), batch_size=2,
                             guidance_scale=2.0, refine=False, progress=False)
    res.stats.save(tmp_path / "stats.safetensors")
    rc = main(["search", "--stats", str(tmp_path / "stats.safetensors"), "--no-refine", "--steps", "3",
               "--guidance-scale", "5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--guidance-scale=5.0 has no effect" in err and "--no-refine" in err
    assert "guidance_scale" not in err


def test_cli_timestep_shift_flag_reaches_the_fit_and_its_errors_name_it(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    base = ["search", "--pipeline", "digits", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]
    assert main(base + ["--timestep-shift", "--path", "minimax"]) == 2
    err = capsys.readouterr().err
    assert "--timestep-shift only apply to --path refit" in err and "timestep_shift" not in err
    assert not (tmp_path / "o").exists()
