"""The per-step timestep shift (``shift.shift_timesteps``): its coordinate search against a brute-force one built on
``sequential_refit`` (every try re-fitted from scratch), what it may and may not change, its evaluation count, and its
refusals."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler

from olss_fast.core.refine import sequential_refit
from olss_fast.core.shift import SHIFT_FRACTIONS, shift_evaluations, shift_timesteps
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.step import student_latent
from olss_fast.models.gmm import make_gmm
from helpers import raises_exactly


def _problem(seed: int, path=(0, 6, 11, 16)):
    """A Gaussian mixture's exact epsilon, 16 noises, a 20-step DDIM teacher: the path's timesteps and targets."""
    pipe = make_gmm((2, 4, 4), num_components=3, seed=seed)
    unet = pipe.unet
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(20)
    x = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
    x0, lat = x.clone(), [x.clone()]
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
            lat.append(x.clone())
    times = [int(sched.timesteps[i]) for i in path]
    targets = torch.stack([lat[i] for i in list(path[1:]) + [20]])
    calls = []

    def denoise(z, t):
        calls.append(int(t))
        return unet(z, t).sample

    return times, x0, targets, denoise, calls, list(path)


def _final_error(times, x0, targets, denoise, path):
    n = len(times)
    s = OLSSSchedule(times, path, torch.zeros(n, n + 1, dtype=torch.float64), teacher_steps=20)

    def evaluate(j, coeffs, history):
        return denoise(student_latent(coeffs, j, x0, history), times[j])

    return sequential_refit(s, x0, targets, evaluate, progress=False).errors[-1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_search_equals_a_brute_force_coordinate_search_of_full_re_fits(seed):
    times, x0, targets, denoise, calls, path = _problem(seed)
    got, err, used = shift_timesteps(times, x0, targets, denoise)
    # reference: the same coordinate order and tries, every try a fresh sequential_refit
    chosen, best, tries = list(times), _final_error(times, x0, targets, denoise, path), 0
    for j in range(1, len(times)):
        below = chosen[j + 1] if j + 1 < len(times) else -1
        nxt = times[j + 1] if j + 1 < len(times) else 0
        tried = {chosen[j]}
        for f in SHIFT_FRACTIONS:
            t = int(round(times[j] - f * (times[j] - nxt)))
            if t in tried or not below < t < chosen[j - 1]:
                continue
            tried.add(t)
            tries += len(times) - j
            trial = chosen[:j] + [t] + chosen[j + 1:]
            e = _final_error(trial, x0, targets, denoise, path)
            if e < best:
                chosen, best = trial, e
    assert got == chosen
    assert err == pytest.approx(best, rel=1e-9, abs=1e-15)
    assert used == len(times) + tries <= shift_evaluations(len(times))
    assert got != times  # (these problems do shift: the test is not of the trivial case)


def test_what_the_shift_keeps():
    """Step 0 stays, timesteps stay integers, strictly descending and above 0 … the next one, and the final error
    never exceeds the unshifted path's."""
    for seed in range(3):
        times, x0, targets, denoise, calls, path = _problem(seed, path=(0, 3, 9, 14, 18))
        got, err, _ = shift_timesteps(times, x0, targets, denoise)
        assert got[0] == times[0] and all(isinstance(t, int) for t in got)
        assert all(a > b for a, b in zip(got, got[1:])) and got[-1] >= 0
        assert err <= _final_error(times, x0, targets, denoise, path) * (1 + 1e-12)
        # every evaluation was at a kept or tried timestep, and the last step's tries stay above 0
        assert min(calls) >= 0


def test_no_fractions_changes_nothing_and_costs_one_run():
    times, x0, targets, denoise, calls, path = _problem(0)
    got, err, used = shift_timesteps(times, x0, targets, denoise, fractions=())
    assert (got, used) == (times, len(times))
    assert err == pytest.approx(_final_error(times, x0, targets, denoise, path), rel=1e-12)
    assert shift_evaluations(4) == 4 + len(SHIFT_FRACTIONS) * 6 and shift_evaluations(1, (0.5,)) == 1


def test_refusals():
    times, x0, targets, denoise, _, _ = _problem(0)
    with raises_exactly("shift_timesteps needs integer (VP) timesteps, got [999.0, 700.0, 450.0, 200.0]"):
        shift_timesteps([999.0, 700.0, 450.0, 200.0], x0, targets, denoise)
    with raises_exactly("timesteps must be non-negative and strictly descending, got [999, 450, 700, 200]"):
        shift_timesteps([999, 450, 700, 200], x0, targets, denoise)
    with raises_exactly("timesteps must be non-negative and strictly descending, got [999, 450, 200, -1]"):
        shift_timesteps([999, 450, 200, -1], x0, targets, denoise)
    with raises_exactly("targets must be [4, *noise.shape] = [4, [16, 2, 4, 4]], got [3, 16, 2, 4, 4]"):
        shift_timesteps(times, x0, targets[:3], denoise)
    with raises_exactly("shift_timesteps needs integer (VP) timesteps, got [True, 0]"):
        shift_timesteps([True, 0], x0, targets[:2], denoise)


def _recorded_fit(**options):
    from olss_fast import fit_olss_scheduler
    pipe = make_gmm((2, 4, 4), num_components=3, seed=0)
    pipe.set_progress_bar_config(disable=True)
    res = fit_olss_scheduler(pipe, [None] * 24, teacher_steps=20, num_steps=(3, 4), batch_size=24,
                             search_samples=8, progress=False, **options)
    return pipe, res


def test_the_fit_judges_the_shifted_proposal_in_the_uniform_paths_place():
    """A VP model with ``timestep_shift=True``: every step count's proposal is also judged with its timesteps shifted
    (fitted on the search samples); the uniform path is not a candidate then. Where the shift changed nothing, there
    is no such candidate. Off (the default): the uniform path, no shift."""
    _, res = _recorded_fit(timestep_shift=True)
    shifted_any = False
    for n, s in res.schedules.items():
        info, held = s.meta["refit_search"], s.meta["heldout"]
        assert info["candidates"] == ["minimax"] and info["shift_evaluations"] > 0
        shifted = info["shifted_timesteps"]
        proposal_times = [int(res.stats.timesteps[i]) for i in info["proposal"]]
        assert len(shifted) == n and shifted[0] == proposal_times[0]
        names = set(held["errors"]) - {"baseline"}
        assert names == ({"proposal", "minimax", "shifted"} if shifted != proposal_times else {"proposal", "minimax"})
        shifted_any |= shifted != proposal_times
        if held["chosen"] == "shifted":
            assert s.timesteps == shifted and s.indices == info["proposal"]
            assert res.paper_schedules[n].timesteps == proposal_times  # the paper's fit keeps the teacher's
    assert shifted_any
    _, off = _recorded_fit()  # (off by default)
    for s in off.schedules.values():
        info = s.meta["refit_search"]
        assert info["candidates"] == ["minimax", "uniform"] and info["shifted_timesteps"] is None
        assert "shifted" not in s.meta["heldout"]["errors"]


def test_a_shifted_schedule_runs_in_the_pipeline_as_it_was_judged():
    """The pipeline, through OLSSScheduler, evaluates the model at the shifted timesteps: its final latents equal
    the student the held-out choice ran (run_student with the same coefficients, timesteps and model)."""
    from olss_fast.core.heldout import run_student
    from olss_fast.fit.baselines import sample
    from olss_fast.serve.scheduler import OLSSScheduler

    pipe, res = _recorded_fit(timestep_shift=True)
    x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    for n, s in res.schedules.items():
        shifted = dataclasses.replace(s, timesteps=s.meta["refit_search"]["shifted_timesteps"])
        sched = OLSSScheduler.from_schedules([shifted], config=dict(pipe.scheduler.config))
        seen = []
        unet_forward = pipe.unet.forward

        def spy(sample, timestep, *a, **k):
            seen.append(int(timestep))
            return unet_forward(sample, timestep, *a, **k)

        pipe.unet.forward = spy
        try:
            got = sample(pipe, sched, [None] * 5, x, n)
        finally:
            pipe.unet.forward = unet_forward
        assert seen == shifted.timesteps
        want = run_student(torch.as_tensor(shifted.coeffs), shifted.timesteps, x, lambda z, t: pipe.unet(z, t).sample)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_timestep_shift_option():
    from olss_fast import FitConfig, fit_olss_scheduler
    from olss_fast.testing import tiny_flux_pipeline

    with raises_exactly("timestep_shift only apply to path='refit' (the path search judged after the re-fit), not "
                        "to path='minimax': drop them or use path='refit'"):
        FitConfig(path="minimax", timestep_shift=True)
    with raises_exactly("timestep_shift must be true or false, got 1"):
        FitConfig(timestep_shift=1)
    with raises_exactly("timestep_shift=True is not supported for flow-matching models (the shift is fitted on the "
                        "integer timesteps of VP models); leave it out"):
        fit_olss_scheduler(tiny_flux_pipeline(), ["a cat"], teacher_steps=8, num_steps=(2,), timestep_shift=True,
                           progress=False)
