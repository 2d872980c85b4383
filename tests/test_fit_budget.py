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
from olss_fast.core.grid import programme_states
from olss_fast.core.shift import shift_evaluations
from olss_fast.core.search import paper_schedule, uniform_path
from olss_fast.fit.orchestration import plan_fit, plan_search, split_heldout
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


@pytest.mark.parametrize("shift", [False, True], ids=["no-shift", "shift"])
def test_plan_counts_every_evaluation_of_the_fit(shift):
    """On the Gaussian mixture (no CFG: one row per sample), with given search samples and stride, the rows through
    the denoiser are exactly: the recording, the programme (programme_states per search sample), the re-fit of every
    distinct candidate path on the fit part and its run on the held-out part (unless refused for its
    amplification), the DDIM baseline's run there, with
    every distinct path prefix (step j of a re-fitted path is fixed by its first j + 1 indices and timesteps; step 0,
    the initial noise at the first teacher timestep, is shared by every path and the baseline) evaluated once per
    sample; with the timestep shift, the evaluations it reports making on the search samples, and the shifted
    proposal is a candidate in the uniform path's place. Here the paths share more than step 0. The plan counts
    three distinct candidates per step count sharing step 0 only: an upper bound."""
    pipe = make_gmm((2, 4, 4), num_components=3, seed=0)
    pipe.set_progress_bar_config(disable=True)
    counter = RowCounter(pipe.unet)
    steps, T = (3, 4), 20
    res = fit_olss_scheduler(pipe, [None] * 24, teacher_steps=T, num_steps=steps, batch_size=24,
                             search_samples=6, search_stride=2, timestep_shift=shift, progress=False)
    held, fitpart = split_heldout(24, None)
    assert len(held) == 6 and len(fitpart) == 18
    prefixes, ran, baseline_steps, unshared = set(), set(), 0, 1
    for n, s in res.schedules.items():
        assert s.path == "refit"
        info = s.meta["refit_search"]
        minimax = paper_schedule(res.stats, n, path="minimax")
        proposal = [int(res.stats.timesteps[i]) for i in info["proposal"]]
        paths = {"minimax": (tuple(minimax.indices), tuple(minimax.timesteps)),
                 "proposal": (tuple(info["proposal"]), tuple(proposal))}
        if shift:
            paths["shifted"] = (tuple(info["proposal"]), tuple(info["shifted_timesteps"]))
        else:
            uniform = uniform_path(T, n)
            paths["uniform"] = (tuple(uniform), tuple(int(res.stats.timesteps[i]) for i in uniform))
        assert set(s.meta["heldout"]["errors"]) == set(paths) | {"baseline"}
        # step j of a re-fitted path is determined by its first j + 1 indices and timesteps; every candidate is
        # re-fitted on the fit part, and run on the held-out part unless refused for its amplification (error None)
        steps_of = {name: {(idx[: j + 1], times[: j + 1]) for j in range(n)} for name, (idx, times) in paths.items()}
        prefixes |= set().union(*steps_of.values())
        ran |= set().union(*(v for name, v in steps_of.items() if s.meta["heldout"]["errors"][name] is not None))
        unshared += len(set(paths.values())) * (n - 1)  # the count if paths shared step 0 only
        baseline_steps += n - 1  # the DDIM baseline's steps after step 0, on the held-out part
    shifting = 0
    if shift:
        used = res.schedules[3].meta["refit_search"]["shift_evaluations"]
        assert 0 < used <= shift_evaluations(3) + shift_evaluations(4)
        shifting = 6 * used
    programme = programme_states(T, steps, 2)
    expected = (24 * T + 6 * programme + shifting + 18 * len(prefixes) + 6 * (len(ran) + baseline_steps))
    assert counter.rows == expected
    assert len(prefixes) < unshared  # the paths do share more than step 0 here
    cfg = FitConfig(num_steps=steps, search_samples=6, search_stride=2)
    plan = plan_fit(T, steps, 24, 24, cfg, shift=shift).search
    assert (plan.samples, plan.stride) == (6, 2)
    assert plan.evaluations == (24 * T + 6 * programme + 18 * (3 * 7 - 5) + 6 * (4 * 7 - 7)
                                + (6 * (shift_evaluations(3) + shift_evaluations(4)) if shift else 0))
    assert expected <= plan.evaluations
    counter.handle.remove()


def test_short_teacher_drops_the_uniform_candidate_and_re_fit_samples_to_stay_within_budget(monkeypatch, caplog):
    """An 8-step teacher for 3 and 4 steps, 24 samples: the full plan (three candidates on 18 fit / 6 held-out samples)
    is over 3x, since each candidate's re-fit costs about one recording; the reduced plan (no uniform path; here
    all 24 re-fit samples still fit, with 5 search samples) stays within it, with no warning, and records what it
    ran on."""
    monkeypatch.setattr(checks, "_warned", set())
    T, steps = 8, (3, 4)
    cfg = FitConfig(num_steps=steps)
    full = plan_search(T, steps, 24, 18, 6, cfg)
    assert full.evaluations > full.budget == 3 * 24 * T
    plan = plan_fit(T, steps, 24, 24, cfg)
    assert plan.reduced and plan.candidates == ("minimax",)
    assert (plan.refit_samples, plan.heldout_samples, plan.search.samples, plan.search.stride) == (24, 6, 5, 1)
    # recording, programme, two candidates' re-fits (18 x (2 x 7 - 4 + 1)) and three held-out runs (6 x (3 x 7 - 6 + 1))
    assert plan.search.evaluations == 24 * T + 5 * programme_states(T, steps, 1) + 18 * 11 + 6 * 16 <= 576
    pipe = make_gmm((2, 4, 4), num_components=3, seed=0)
    pipe.set_progress_bar_config(disable=True)
    counter = RowCounter(pipe.unet)
    with caplog.at_level(logging.WARNING):
        res = fit_olss_scheduler(pipe, [None] * 24, teacher_steps=T, num_steps=steps, batch_size=24, progress=False)
    assert not [r for r in caplog.records if "above evaluation_budget" in r.getMessage()]
    assert counter.rows <= plan.search.evaluations <= 3 * 24 * T
    for s in res.schedules.values():
        assert set(s.meta["heldout"]["errors"]) <= {"proposal", "minimax", "baseline"}
        info = s.meta["refit_search"]  # (also where the guard fell back to DDIM: candidate "baseline")
        assert (info["refit_samples"], info["candidates"], info["samples"]) == (24, ["minimax"], 5)
        assert info["candidate"] == s.meta["heldout"]["chosen"]
        assert s.path == ("ddim" if info["candidate"] == "baseline" else "refit")
    assert {s.meta["refit_search"]["candidate"] for s in res.schedules.values()} == {"baseline"}  # (this tiny case)
    counter.handle.remove()
    # given sizes are kept as they are: the full plan, over the budget
    for given in (dict(refine_samples=24), dict(heldout_samples=6), dict(search_samples=5), dict(search_stride=1)):
        kept = plan_fit(T, steps, 24, 24, FitConfig(num_steps=steps, **given))
        assert not kept.reduced and kept.candidates == ("minimax", "uniform")
        assert kept.search.evaluations > kept.search.budget


def test_no_plan_fits_a_very_short_teacher_the_cheapest_one_runs_and_warns_once(monkeypatch, caplog):
    """A 6-step teacher for 3 and 4 steps on 12 samples: not even the smallest reduced plan (12 re-fit samples, the
    min-max path alone, 2 search samples) fits 3x, so that one, the cheapest, runs over the budget (the full plan
    would cost more), and the fit says so once."""
    monkeypatch.setattr(checks, "_warned", set())
    T, steps = 6, (3, 4)
    plan = plan_fit(T, steps, 12, 12, FitConfig(num_steps=steps))
    assert plan.reduced and plan.candidates == ("minimax",) and plan.refit_samples == 12
    assert plan.search.samples == 2 and plan.search.evaluations > plan.search.budget == 3 * 12 * T
    full = plan_search(T, steps, 12, 9, 3, FitConfig(num_steps=steps))
    assert full.evaluations > plan.search.evaluations
    pipe = make_gmm((2, 4, 4), num_components=3, seed=0)
    pipe.set_progress_bar_config(disable=True)
    counter = RowCounter(pipe.unet)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            counter.rows = 0
            res = fit_olss_scheduler(pipe, [None] * 12, teacher_steps=T, num_steps=steps, batch_size=12,
                                     progress=False)
    over = [r.getMessage() for r in caplog.records if "above evaluation_budget" in r.getMessage()]
    assert len(over) == 1 and "the programme (2 samples" in over[0] and "the teacher has 6 steps" in over[0]
    assert "Record more samples or more teacher steps, or raise evaluation_budget" in over[0]
    planned = int(re.search(r"plans (\d+) model evaluations", over[0]).group(1))
    # (the plan is an upper bound: here the candidates' shared prefixes bring what the fit makes under the budget)
    assert planned == plan.search.evaluations and 0 < counter.rows <= planned
    assert set(res.schedules) == {3, 4} and res.schedules[3].meta["refit_search"]["candidates"] == ["minimax"]
    counter.handle.remove()


def test_a_reduced_plan_keeps_its_grid_and_the_fit_runs_the_plan(monkeypatch):
    """The tiny SD3 / Flux sizes (28 teacher steps for 4-10 steps, 24 recorded samples): the reduced plans give up
    search samples (down to 2) and re-fit samples, not the grid, which for 28 teacher steps is every index; the fit's
    programme runs on that plan. Where no plan on that grid fits (evaluation_budget=2), the cheapest plan runs, and
    that is the smallest reduced plan on a coarser grid."""
    monkeypatch.setattr(checks, "_warned", set())
    T = 28
    at3 = plan_fit(T, STEPS, 24, 24, FitConfig(num_steps=STEPS))
    assert at3.reduced and at3.refit_samples == 14 and (at3.search.samples, at3.search.stride) == (2, 1)
    assert at3.search.evaluations <= at3.search.budget
    # the full plan would coarsen to reach its 8 search samples
    assert plan_search(T, STEPS, 24, 18, 6, FitConfig(num_steps=STEPS)).stride == 2
    at2 = plan_fit(T, STEPS, 24, 24, FitConfig(num_steps=STEPS, evaluation_budget=2))
    assert at2.reduced and at2.refit_samples == 12 and (at2.search.samples, at2.search.stride) == (2, 2)
    assert at2.search.budget < at2.search.evaluations < at3.search.evaluations
    on_grid = plan_search(T, STEPS, 24, 9, 3, FitConfig(num_steps=STEPS, evaluation_budget=2), {n: 2 for n in STEPS},
                          min_samples=2, coarsen=False)
    assert on_grid.stride == 1 and on_grid.evaluations > at2.search.evaluations
    pipe = make_gmm((2, 4, 4), num_components=3, seed=0)
    pipe.set_progress_bar_config(disable=True)
    for budget, plan in ((3, at3), (2, at2)):
        res = fit_olss_scheduler(pipe, [None] * 24, teacher_steps=T, num_steps=STEPS, batch_size=24, progress=False,
                                 evaluation_budget=budget)
        for s in res.schedules.values():
            info = s.meta["refit_search"]
            assert (info["samples"], info["stride"], info["refit_samples"]) == (
                plan.search.samples, plan.search.stride, plan.refit_samples)


@pytest.mark.parametrize("T, recorded", [(28, 24), (28, 12), (100, 16), (6, 12)])
def test_a_lower_budget_never_plans_a_costlier_fit(T, recorded):
    """The planned evaluations never grow as evaluation_budget falls, also below what any plan can meet (the tiny
    SD3 / Flux case of fit_cost.py is T = 28, 24 recorded samples: 2.92x planned at the default 3, 2.40x at 2)."""
    steps = (4, 5, 6) if T == 6 else STEPS
    planned = [plan_fit(T, steps, recorded, recorded, FitConfig(num_steps=steps, evaluation_budget=b)).search
               for b in (4, 3, 2.5, 2, 1.5, 1)]
    costs = [p.evaluations for p in planned]
    assert costs == sorted(costs, reverse=True), costs
    assert any(p.evaluations > p.budget for p in planned)  # the smaller budgets cannot be met


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
    # a timestep shift asked for is kept, over the budget if need be: on 16 recorded samples its runs on the 12
    # search samples (12 x 449) exceed the whole budget; with 1000 recorded samples it fits, on 16 of them
    assert sum(shift_evaluations(n) for n in STEPS) == 449
    small = plan_fit(100, STEPS, 16, 16, FitConfig(num_steps=STEPS, timestep_shift=True), shift=True)
    assert small.shift and not small.reduced and small.candidates == ("minimax",)
    assert small.search.evaluations > small.search.budget
    large = plan_fit(100, STEPS, 1000, 1000, FitConfig(num_steps=STEPS, timestep_shift=True), shift=True)
    assert large.shift and large.search.evaluations <= large.search.budget
    # (the shifted proposal takes the uniform path's place: the same number of candidates, the same programme)
    assert large.search.evaluations - plan_fit(100, STEPS, 1000, 1000, cfg).search.evaluations == 16 * 449
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
