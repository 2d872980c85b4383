"""The default fit's cost: its model evaluations (latent rows through the denoiser, classifier-free guidance included)
stay within 3x those of its own teacher recording on a tiny Stable Diffusion pipeline, and the plan that sizes the
search predicts them exactly."""
from __future__ import annotations

import logging
import re

import pytest
import torch

from olss_fast import FitConfig, fit_olss_scheduler, record_trajectories
from olss_fast.core import checks
from olss_fast.core.refine import programme_states
from olss_fast.core.search import paper_schedule, uniform_path
from olss_fast.fit.orchestration import plan_search, split_heldout
from olss_fast.models.gmm import make_gmm
from olss_fast.pipelines.facts import denoiser_of
from olss_fast.testing import tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = (4, 5, 6, 8, 10)


class RowCounter:
    """Counts the latent rows the pipeline's denoiser is called on (CFG doubles them)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.rows += sample.shape[0]


def test_default_fit_evaluates_at_most_three_times_its_teacher_recording():
    """16 prompts, a 100-step teacher, 4-10 steps: the recording alone evaluates 16 x 2 (CFG) x 100 rows; the whole
    default fit (recording, refit programme, re-fit of the candidates, held-out check) at most 3x that. (Before the
    search was sized to a budget it evaluated 34,656 rows: 10.8x.)"""
    pipe = tiny_sd_pipeline()
    counter = RowCounter(denoiser_of(pipe))
    prompts = [f"prompt {i}" for i in range(16)]
    record_trajectories(pipe, prompts, teacher_steps=100, batch_size=16, guidance_scale=7.5, progress=False)
    recording = counter.rows
    assert recording == 16 * 2 * 100
    counter.rows = 0
    res = fit_olss_scheduler(pipe, prompts, teacher_steps=100, num_steps=STEPS, batch_size=16, guidance_scale=7.5,
                             progress=False)
    fit_rows = counter.rows
    assert fit_rows <= 3 * recording, f"the default fit evaluated {fit_rows} rows, {fit_rows / recording:.2f}x its " \
                                      "recording (budget 3x)"
    # the search did run: a programme on the fit part, its proposal judged with the min-max and uniform paths
    info = [s.meta["refit_search"] for s in res.schedules.values() if "refit_search" in s.meta]
    assert info and all(i["samples"] >= 1 and i["programme_evaluations"] > 0 for i in info)
    # the plan it was sized by bounds the rows (two per sample evaluation here)
    assert fit_rows <= 2 * info[0]["planned_evaluations"] <= 3 * recording
    counter.handle.remove()


def test_plan_counts_every_evaluation_of_the_fit():
    """On the Gaussian mixture (no CFG: one row per sample), with given search samples and stride, the rows through
    the denoiser are exactly: the recording, the programme (programme_states per search sample), the re-fit of every
    distinct candidate path on the fit part and its run on the held-out part, the DDIM baseline's run there, with
    step 0 (the initial noise at the first teacher timestep, the same for every path) evaluated once per sample.
    The plan's count is that with three distinct candidates per step count."""
    pipe = make_gmm((2, 4, 4), num_components=3, seed=0)
    pipe.set_progress_bar_config(disable=True)
    counter = RowCounter(pipe.unet)
    steps, T = (3, 4), 20
    res = fit_olss_scheduler(pipe, [None] * 24, teacher_steps=T, num_steps=steps, batch_size=24,
                             search_samples=6, search_stride=2, progress=False)
    held, fitpart = split_heldout(24, None)
    assert len(held) == 6 and len(fitpart) == 18
    fit_evals = held_evals = 0
    for n, s in res.schedules.items():
        assert s.path == "refit" and None not in s.meta["heldout"]["errors"].values()  # every candidate ran
        paths = {tuple(uniform_path(T, n)), tuple(paper_schedule(res.stats, n, path="minimax").indices),
                 tuple(s.meta["refit_search"]["proposal"])}
        fit_evals += len(paths) * (n - 1)  # step 0 of every path is the one shared evaluation
        held_evals += (len(paths) + 1) * (n - 1)  # the candidates and the baseline
    expected = 24 * T + 6 * programme_states(T, steps, 2) + 18 * (fit_evals + 1) + 6 * (held_evals + 1)
    assert counter.rows == expected
    plan = plan_search(T, steps, 24, 18, 6, FitConfig(num_steps=steps, search_samples=6, search_stride=2))
    assert (plan.samples, plan.stride) == (6, 2)
    assert plan.evaluations == 24 * T + 6 * programme_states(T, steps, 2) + 18 * (3 * 7 - 5) + 6 * (4 * 7 - 7)
    assert expected <= plan.evaluations


def test_short_teacher_runs_the_smallest_programme_and_warns_once(monkeypatch, caplog):
    """An 8-step teacher for 3 and 4 steps: the recording and the candidates' re-fits leave room for fewer than 8
    search samples on any grid, so the fit runs 8 anyway (on the coarsest grid), goes over 3x, and says so once."""
    monkeypatch.setattr(checks, "_warned", set())
    pipe = make_gmm((2, 4, 4), num_components=3, seed=0)
    pipe.set_progress_bar_config(disable=True)
    counter = RowCounter(pipe.unet)
    T, steps = 8, (3, 4)
    plan = plan_search(T, steps, 24, 18, 6, FitConfig(num_steps=steps))
    assert plan.samples == 8 and plan.evaluations > plan.budget == 3 * 24 * T
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            counter.rows = 0
            res = fit_olss_scheduler(pipe, [None] * 24, teacher_steps=T, num_steps=steps, batch_size=24,
                                     progress=False)
    over = [r.getMessage() for r in caplog.records if "above evaluation_budget" in r.getMessage()]
    assert len(over) == 1 and "the programme (8 samples" in over[0] and "the teacher has 8 steps" in over[0]
    planned = int(re.search(r"plans (\d+) model evaluations", over[0]).group(1))
    assert 3 * 24 * T < counter.rows <= planned
    assert set(res.schedules) == {3, 4}
    counter.handle.remove()


def test_plan_sizes_the_search_to_the_budget():
    cfg = FitConfig(num_steps=STEPS)
    # the tiny SD case above: 16 recorded samples, 12 fit / 4 held out; the recording costs 1600 sample evaluations,
    # the three candidates' re-fits 12 x (99 - 14), their and DDIM's held-out runs 4 x (132 - 19): 1728 are left,
    # which on the 25-index grid (stride 4) is 8 search samples (the minimum)
    plan = plan_search(100, STEPS, 16, 12, 4, cfg)
    assert plan.budget == 4800 and plan.evaluations <= 4800
    assert 1728 // programme_states(100, STEPS, 4) == 8
    assert (plan.samples, plan.stride) == (8, 4)
    assert plan.evaluations == 4800 - 1728 + 8 * programme_states(100, STEPS, 4)
    # fewer distinct candidates (min-max = uniform for 4, 5 and 6 steps) leave room for more search samples: each
    # saves n - 1 evaluations (step 0 is shared) per fit and per held-out sample
    fewer = plan_search(100, STEPS, 16, 12, 4, cfg, {4: 2, 5: 2, 6: 2})
    assert (fewer.samples, fewer.stride) == ((1728 + 12 * 12 + 4 * 12) // programme_states(100, STEPS, 4), 4) == (9, 4)
    # many recorded samples: every fit sample fits on the full grid
    big = plan_search(100, STEPS, 1000, 48, 16, cfg)
    assert (big.samples, big.stride) == (48, 1)
    # too little room for 8 samples on the 25-index grid (12 recorded: 3600 - 1200 - 9 x 85 - 3 x 113 = 1296 left):
    # the next coarser grid that takes 8
    assert [1296 // programme_states(100, STEPS, g) for g in (4, 5)] == [6, 8]
    tight = plan_search(100, STEPS, 12, 9, 3, cfg)
    assert (tight.samples, tight.stride) == (8, 5) and tight.evaluations <= tight.budget
    # a 28-step teacher for 4-10 steps: the candidates' re-fits alone (33 evaluations per sample each) exceed 3x the
    # recording; the smallest programme (8 samples on the coarsest grid) runs anyway and the plan says it is over
    over = plan_search(28, STEPS, 24, 18, 6, cfg)
    assert (over.samples, over.stride) == (8, 2) and over.evaluations > over.budget == 3 * 24 * 28
    # given options are kept
    given = plan_search(100, STEPS, 16, 12, 4, FitConfig(num_steps=STEPS, search_samples=4, search_stride=3))
    assert (given.samples, given.stride) == (4, 3)
    with pytest.raises(ValueError, match="evaluation_budget"):
        FitConfig(evaluation_budget=0.5)
    with pytest.raises(ValueError, match="evaluation_budget only apply to path='refit'"):
        FitConfig(path="uniform", evaluation_budget=2.0)
    with pytest.raises(ValueError, match="heldout_samples"):
        FitConfig(heldout_samples=-1)
    with pytest.raises(ValueError, match="leaves none of the 4 re-fit samples"):
        split_heldout(4, 4)
    assert split_heldout(1, None) == ([], [0]) and split_heldout(8, None) == ([0, 7], [1, 2, 3, 4, 5, 6])
