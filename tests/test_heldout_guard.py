"""The held-out choice and the guard (core.heldout, the re-fit of fit_olss_scheduler): the path kept is the best of the
candidates on held-out samples none of them was fitted on, never worse there than plain DDIM of the same NFE (when the
re-fit loses, the result *is* DDIM, checked against diffusers' DDIMScheduler); the paper's fit without the re-fit warns
once; the DDIM/Euler baselines equal diffusers' own samplers."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from olss_fast import OLSSScheduler, fit_olss_scheduler, search_schedule
from olss_fast.core import checks
from olss_fast.core.heldout import choose_on_heldout, final_mse, reuse_outputs
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.search import uniform_path
from olss_fast.fit.baselines import sample
from olss_fast.fit import orchestration
from olss_fast.fit.orchestration import split_heldout
from olss_fast.fit.teacher import default_teacher, first_order_coefficients
from olss_fast.fit.work import item_noise, make_work_items
from olss_fast.models.gmm import make_gmm
from helpers import assert_close_scaled

pytestmark = pytest.mark.usefixtures("one_thread")


def mse(a, b):
    return float((a.double() - b.double()).pow(2).mean())


def heldout_set(pipe, count, shape, T, base_seed=0):
    """The held-out part of fit_olss_scheduler's re-fit samples (positions from split_heldout) and the teacher's
    final latents on it, computed again through the pipeline."""
    items = make_work_items([None] * count, base_seed=base_seed)
    held, _ = split_heldout(count, None)
    x0 = item_noise([items[k] for k in held], shape)
    teacher = sample(pipe, default_teacher(pipe.scheduler), [None] * len(held), x0, T)
    return x0, teacher


def ddim_like_teacher(pipe):
    """Diffusers' DDIM on the teacher's trailing grid, ending at clean data like the DPM-Solver++ teacher."""
    return DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True, timestep_spacing="trailing",
                                     clip_sample=False)


def test_guard_returns_plain_ddim_when_every_refit_loses_on_heldout_noise(monkeypatch):
    """Every re-fit spoiled (its last row scaled by 1.5: the final latent overshoots): on the held-out samples every
    candidate is worse than DDIM, so the fit returns DDIM itself (it samples exactly like diffusers' DDIMScheduler),
    and the held-out errors it reports are the ones measured again through the pipeline."""
    real = orchestration.refine_through_pipeline

    def spoiled(*args, **kwargs):
        s = real(*args, **kwargs)
        coeffs = s.coeffs.clone()
        coeffs[-1] *= 1.5
        return dataclasses.replace(s, coeffs=coeffs)

    monkeypatch.setattr(orchestration, "refine_through_pipeline", spoiled)
    pipe = make_gmm((2, 4, 4), num_components=3, seed=0)
    pipe.set_progress_bar_config(disable=True)
    res = fit_olss_scheduler(pipe, [None] * 12, teacher_steps=20, num_steps=(4, 5), batch_size=12, progress=False)
    x0, teacher = heldout_set(pipe, 12, (2, 4, 4), 20)
    for n, s in res.schedules.items():
        info = s.meta["heldout"]
        assert s.path == "ddim" and not s.refined and info["chosen"] == "baseline" and info["heldout_samples"] == 3
        assert s.indices == uniform_path(20, n) and res.paper_schedules[n].path == "ddim"
        candidates = {k: (v if v is not None else float("inf")) for k, v in info["errors"].items() if k != "baseline"}
        assert len(candidates) == 3 and min(candidates.values()) > info["errors"]["baseline"]
        ddim = sample(pipe, ddim_like_teacher(pipe), [None] * 3, x0, n)
        olss = sample(pipe, res.scheduler, [None] * 3, x0, n)
        assert_close_scaled(olss, ddim, 1e-5)
        assert mse(ddim, teacher) == pytest.approx(info["errors"]["baseline"], rel=1e-4)


def test_heldout_choice_keeps_the_best_candidate_and_reports_its_true_error():
    """Where the re-fit wins, the kept schedule is the candidate with the lowest pooled error among those that beat
    DDIM on the held-out part, its held-out error is its own error on the held-out noise run through the pipeline by
    OLSSScheduler, and it beats DDIM's."""
    pipe = make_gmm((1, 2, 2), num_components=3, seed=2)
    pipe.set_progress_bar_config(disable=True)
    res = fit_olss_scheduler(pipe, [None] * 8, teacher_steps=30, num_steps=(5, 6), batch_size=8, base_seed=2,
                             progress=False)
    x0, teacher = heldout_set(pipe, 8, (1, 2, 2), 30, base_seed=2)
    for n, s in res.schedules.items():
        info = s.meta["heldout"]
        errs = {k: v for k, v in info["errors"].items() if k != "baseline"}
        passing = {k: info["pooled"][k] for k, v in errs.items() if v is not None and v <= info["errors"]["baseline"]}
        assert s.path == "refit" and s.refined and info["chosen"] == min(passing, key=passing.get)
        # the pooled error weighs the held-out error and the re-fit's own error by their sample counts (2 and 6)
        own = res.paper_schedules[n]  # (the paper's fit on the kept path; the re-fit's own error is in s.errors)
        assert info["pooled"][info["chosen"]] == pytest.approx((2 * errs[info["chosen"]] + 6 * s.errors[-1]) / 8)
        assert own.indices == s.indices
        assert s.meta["refit_search"]["candidate"] == info["chosen"]
        got = sample(pipe, OLSSScheduler.from_schedules([s], config=dict(pipe.scheduler.config)), [None] * 2, x0, n)
        assert mse(got, teacher) == pytest.approx(errs[info["chosen"]], rel=1e-4)
        assert errs[info["chosen"]] < info["errors"]["baseline"]


def test_choose_on_heldout_unit():
    """Ties keep the first name, a path given twice is re-fitted once, a candidate amplifying far more than the
    baseline is refused without a held-out run, the baseline wins when it is better, and without held-out samples the
    re-fit's own error decides."""
    torch.manual_seed(0)
    pipe = make_gmm((1, 2, 2), num_components=2, seed=1)
    unet = pipe.unet
    runs = []

    def den(x, t):
        runs.append(t)
        return unet(x, t).sample

    ts = list(range(999, 0, -100))
    x0 = torch.randn(4, 1, 2, 2)
    target = torch.randn(4, 1, 2, 2)
    coeffs = first_order_coefficients(default_teacher(pipe.scheduler), ts, [0, 5], "epsilon")
    base = OLSSSchedule(timesteps=[ts[0], ts[5]], indices=[0, 5], coeffs=coeffs, teacher_steps=10, errors=[0.1, 0.2],
                        path="ddim")
    loud = OLSSSchedule(timesteps=[ts[0], ts[5]], indices=[0, 5], coeffs=coeffs * 3.5, teacher_steps=10,
                        errors=[0.1, 0.0])
    calls = []

    def refit(s):
        calls.append(tuple(s.indices))
        return s

    choice = choose_on_heldout({"a": loud, "b": loud}, base, refit, (x0, target, den))
    assert calls == [(0, 5)] and choice.errors["a"] == float("inf") == choice.errors["b"]
    assert choice.amplification["a"] == pytest.approx(3.5) and choice.chosen == "baseline"
    assert len(runs) == 2  # only the baseline ran on the held-out part
    assert choice.schedule.coeffs.equal(base.coeffs) and choice.schedule.meta["heldout"]["errors"]["a"] is None
    assert choice.errors["baseline"] == pytest.approx(final_mse(base.coeffs, base.timesteps, x0, target, den))
    mild = OLSSSchedule(timesteps=[ts[0], ts[5]], indices=[0, 5], coeffs=coeffs * 1.1, teacher_steps=10,
                        errors=[0.1, 0.05])
    choice = choose_on_heldout({"x": mild, "y": base}, base, refit, None)  # no held-out part: the re-fit's own error
    assert choice.chosen == "x" and choice.heldout_samples == 0 and "baseline" not in choice.errors
    choice = choose_on_heldout({"x": loud}, base, refit, None)
    assert choice.chosen == "baseline"
    with pytest.raises(ValueError, match="no candidate"):
        choose_on_heldout({}, base, refit, (x0, target, den))
    with pytest.raises(ValueError, match="baseline's 2 steps"):
        choose_on_heldout({"x": search_schedule_like(3)}, base, refit, None)


def search_schedule_like(n):
    return OLSSSchedule(timesteps=list(range(999, 999 - 100 * n, -100)), indices=list(range(n)),
                        coeffs=torch.eye(n, n + 1), teacher_steps=10)


def test_reuse_outputs_evaluates_each_latent_and_timestep_once_within_its_byte_limit():
    calls = []

    def model(z, t):
        calls.append(t)
        return z * 2 + t

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    nbytes = a.numel() * 4
    den = reuse_outputs(model, max_bytes=2 * nbytes)
    first = den(a, 5)
    assert den(a.clone(), 5) is first and calls == [5]  # equal latents (another tensor) at the same timestep
    torch.testing.assert_close(den(a, 7), a * 2 + 7)  # another timestep
    torch.testing.assert_close(den(b, 5), b * 2 + 5)  # other latents
    nudged = a.clone()
    nudged[2, 1, 3] = torch.nextafter(nudged[2, 1, 3], torch.tensor(1e9))  # one bit differs
    den(nudged, 5)
    den(a.double(), 5)  # another dtype
    assert calls == [5, 7, 5, 5, 5]
    # two float32 outputs fit: the float64 one fills the limit alone, so it is kept and every older one is gone
    den(a.double(), 5)
    assert len(calls) == 5
    den(b, 5)
    assert len(calls) == 6
    big = reuse_outputs(model, max_bytes=nbytes - 1)  # an output larger than the limit is never kept
    big(a, 1), big(a, 1)
    assert calls[-2:] == [1, 1]


def test_paper_fit_warns_once_where_a_user_takes_it(monkeypatch, caplog):
    """search_schedule and fit_olss_scheduler(refine=False) warn once, naming the re-fit; the default fit, which
    searches with the paper's fit internally and then re-fits, does not."""
    monkeypatch.setattr(checks, "_warned", set())
    pipe = make_gmm((2, 4, 4), num_components=3, seed=0)
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING):
        res = fit_olss_scheduler(pipe, [None] * 12, teacher_steps=10, num_steps=(3,), batch_size=12, progress=False)
    assert not [r for r in caplog.records if "paper's fit" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        search_schedule(res.stats, 3)
        search_schedule(res.stats, 4)
        fit_olss_scheduler(None, [], stats=res.stats, num_steps=(3,), refine=False, progress=False)
    msgs = [r.getMessage() for r in caplog.records if "paper's fit" in r.getMessage()]
    assert len(msgs) == 2 and msgs[0].startswith("search_schedule returns the paper's fit")
    assert msgs[1].startswith("fit_olss_scheduler(refine=False) returns the paper's fit")
    assert all("refine_schedule" in m and "DDIM" in m for m in msgs)


def test_first_order_baselines_are_diffusers_ddim_and_euler():
    """The guard's baselines: DDIM coefficients on teacher timesteps equal diffusers' DDIMScheduler stepping on them
    (VP, ending at clean data), Euler's equal FlowMatchEulerDiscreteScheduler on the same sigmas (flow matching)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    outs = [torch.randn(3, 4) for _ in range(4)]
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=True,
                         clip_sample=False, timestep_spacing="trailing")
    ddim.set_timesteps(4)
    teacher = DDIMScheduler.from_config(ddim.config)
    ts = [int(t) for t in ddim.timesteps]
    coeffs = first_order_coefficients(teacher, ts, range(4), "epsilon")
    ref = x.clone()
    for t, e in zip(ddim.timesteps, outs):
        ref = ddim.step(e, t, ref).prev_sample
    got = sum(coeffs[3, k + 1] * outs[k] for k in range(4)) + coeffs[3, 0] * x
    assert_close_scaled(got.float(), ref, 1e-5)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(4)
    fts = [float(t) for t in flow.timesteps]
    coeffs = first_order_coefficients(flow, fts, range(4), "flow")
    ref = x.clone()
    for t, v in zip(flow.timesteps, outs):
        ref = flow.step(v, t, ref).prev_sample
    got = sum(coeffs[3, k + 1] * outs[k] for k in range(4)) + coeffs[3, 0] * x
    assert_close_scaled(got.float(), ref, 1e-5)
