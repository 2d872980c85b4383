"""The searched-schedule side of ``OLSSScheduler``: every refusal with its exact message, the one-time warnings with
their exact text, the state a step leaves behind, and the float32 arithmetic of a low-precision step.

tests/test_scheduler.py holds the diffusers-citizen tests (DDIM bit for bit, save/load, pipelines); this file is
what a mutation of the step or of the selection of a searched schedule must not get past (benchmarks/RESULTS.md,
"Mutation testing")."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from olss_fast import OLSSSchedule, OLSSScheduler
from helpers import ddim_config as _config
from helpers import raises_exactly as _raises

UNCHECKED = ("this OLSSScheduler was put into the pipeline without olss_fast.use_olss_scheduler(pipe, ...): it checks "
             "the latents and timesteps it is given, but cannot see whether its 3-step schedule was fitted for this "
             "model's weights, prediction type and guidance scale (a schedule used on another model gives wrong "
             "images without an error); use_olss_scheduler checks them")


def _coeffs(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, n + 1, generator=g, dtype=torch.float64) * 0.6 + 0.2).tril(1)


def _scheduler(fitted_for=None, **cfg) -> OLSSScheduler:
    s = OLSSSchedule([999, 666, 333], [0, 3, 6], _coeffs(3), teacher_steps=10, fitted_for=fitted_for or {})
    sched = OLSSScheduler.from_schedules([s], config=_config(**cfg))
    sched.checked_for = {"test": True}  # as use_olss_scheduler leaves it (the unchecked warning is tested below)
    return sched


def _loop(sched: OLSSScheduler, x0: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    x = x0
    for t, e in zip(sched.timesteps, outputs):
        x = sched.step(e, t, x).prev_sample
    return x


def test_step_refusals_have_their_own_messages():
    """eta > 0, a first step that is not the first timestep, out-of-order steps, guidance halves not combined, a
    batch that changes mid-sampling, NaN/Inf results (with or without a finite model output)."""
    sched = _scheduler()
    sched.set_timesteps(3)
    x, e = torch.randn(1, 4), torch.randn(1, 4)
    with _raises("eta=1.0 asks for DDIM's stochastic sampling, which the searched 3-step OLSS schedule (a "
                 "deterministic linear combination) cannot do; use eta=0, or a step count without a searched schedule"):
        sched.step(e, 999, x, eta=1.0)
    with _raises("OLSS sampling must start at the first timestep 999, got 666 (the scheduler needs the initial noise "
                 "to combine the model outputs; img2img with strength < 1 needs a step count without a searched "
                 "schedule)"):
        sched.step(e, 666, x)
    with _raises("model_output shape [2, 4] differs from sample shape [1, 4] (combine the classifier-free guidance "
                 "halves before calling step)"):
        sched.step(torch.randn(2, 4), 999, x)
    x1 = sched.step(e, 999, x).prev_sample
    with _raises("step 1 of the searched 3-step OLSS schedule runs at timestep 666, got 333: the steps must follow "
                 "scheduler.timesteps in order"):
        sched.step(e, 333, x1)
    with _raises("sample shape changed mid-sampling: [1, 4] -> [2, 4]"):
        sched.step(torch.randn(2, 4), 666, torch.randn(2, 4))
    sched.set_timesteps(3)
    with _raises("step 0 of the searched 3-step OLSS schedule produced NaN or Inf latents (model output finite: "
                 "False); the images would be noise"):
        sched.step(torch.full((1, 4), float("nan")), 999, x)
    sched.set_timesteps(3)
    with _raises("step 0 of the searched 3-step OLSS schedule produced NaN or Inf latents (model output finite: "
                 "True); the images would be noise"):
        sched.step(torch.full((1, 4), 3e38), 999, torch.full((1, 4), 3e38))


def test_latents_of_another_layout_are_refused_at_the_first_step():
    """The first step compares the latents with the per-sample shape the schedule was fitted for."""
    sched = _scheduler(fitted_for={"latent_shape": [4, 2, 2]})
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match=r"^the 3-step schedule was fitted for latents of shape \[4, 2, 2\] per "
                                         r"sample, but this pipeline samples \[3, 2, 2\]"):
        sched.step(torch.randn(1, 3, 2, 2), 999, torch.randn(1, 3, 2, 2))
    sched.step(torch.randn(1, 4, 2, 2), 999, torch.randn(1, 4, 2, 2))  # the fitted layout is fine


def test_trajectories_follow_each_other_and_restart_mid_way():
    """A finished trajectory is followed by a new one on the same scheduler; a new trajectory started after one or
    after two steps of the last one (the first timestep again) starts over from its own noise."""
    sched = _scheduler()
    sched.set_timesteps(3)
    g = torch.Generator().manual_seed(1)
    x0, other = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    es = [torch.randn(2, 4, generator=g) for _ in range(3)]
    first = _loop(sched, x0, es)
    assert sched.step_index == 3
    assert torch.equal(_loop(sched, x0, es), first)  # a second full trajectory, same answer
    for done in (1, 2):
        _loop(sched, other, es[:done])  # a trajectory left unfinished
        assert sched.step_index == done
        assert torch.equal(_loop(sched, x0, es), first)


def test_a_one_step_schedule_runs_trajectory_after_trajectory():
    """n = 1: every step is a first step and a last one."""
    c = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    sched = OLSSScheduler.from_schedules([OLSSSchedule([999], [0], c, teacher_steps=10)], config=_config())
    sched.set_timesteps(1)
    x, e = torch.randn(2, 4), torch.randn(2, 4)
    for _ in range(3):
        out = sched.step(e, 999, x).prev_sample
        torch.testing.assert_close(out, 0.5 * x + 0.25 * e, rtol=0, atol=1e-6)
        assert sched.step_index == 1


def test_low_precision_steps_combine_in_float32():
    """bfloat16 latents and outputs: the combination x_{j+1} = w_j x0 + Σ v_{j,l} e_l runs in float32 on the
    bfloat16 values and is rounded once, at the end (a combination in bfloat16 rounds at every term)."""
    sched = _scheduler()
    sched.set_timesteps(3)
    c = sched.schedule.coeffs
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 64, generator=g).to(torch.bfloat16)
    es = [torch.randn(4, 64, generator=g).to(torch.bfloat16) for _ in range(3)]
    x = x0
    for j, t in enumerate(sched.timesteps):
        x = sched.step(es[j], t, x).prev_sample
        ref = c[j, 0] * x0.double() + sum(c[j, l + 1] * es[l].double() for l in range(j + 1))
        assert x.dtype == torch.bfloat16
        # float32 arithmetic, one rounding to bfloat16: within half a bfloat16 ulp of the float64 value plus float32
        # rounding, i.e. equal to the rounded float64 value almost everywhere
        same = (x == ref.to(torch.bfloat16)).float().mean().item()
        assert same > 0.97, (j, same)


def test_selecting_a_searched_schedule_sets_its_timesteps_and_state():
    """Integer VP timesteps as int64, the schedule itself selected, the step counter reset."""
    sched = _scheduler()
    sched.set_timesteps(3)
    assert sched.timesteps.dtype == torch.int64 and sched.timesteps.tolist() == [999, 666, 333]
    assert sched.schedule is sched.schedules[3] and sched.running_searched_schedule
    sched.step(torch.randn(1, 4), 999, torch.randn(1, 4))
    sched.set_timesteps(3)
    assert sched.step_index is None


def test_custom_timesteps_are_refused_unless_they_are_the_fitted_ones():
    sched = _scheduler()
    sched.set_timesteps(timesteps=[999, 666, 333])
    with _raises("custom timesteps [999, 666, 334] cannot be honoured: the searched 3-step schedule runs its fitted "
                 "timesteps [999, 666, 333]; pass no timesteps (or those)"):
        sched.set_timesteps(timesteps=[999, 666, 334])


def _flow(fitted_for=None, **cfg) -> OLSSScheduler:
    flow = FlowMatchEulerDiscreteScheduler(**cfg)
    s = OLSSSchedule([1000.0, 500.0, 12.345], [0, 4, 8], _coeffs(3), teacher_steps=10, prediction_type="flow",
                     fitted_for=fitted_for or {})
    sched = OLSSScheduler.from_schedules([s], config=flow.config)
    sched.checked_for = {"test": True}
    return sched


def test_flow_sigmas_accept_the_default_grid_and_the_fitted_sigmas_within_tolerance():
    """The pipeline's default grid and the schedule's own sigmas (timestep / N) pass, each within rtol 1e-5 and atol
    1e-6 (a small sigma only meets the absolute tolerance); anything else is refused, as floats rounded to 4 digits."""
    sched = _flow()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3))
    sched.set_timesteps(sigmas=[1.0, 0.5, 0.012345])
    sched.set_timesteps(sigmas=[1.0, 0.5, 0.0123459])  # 9e-7 off a sigma of 0.0123: rtol alone allows 1.2e-7
    assert sched.timesteps.dtype == torch.float32
    assert torch.equal(sched.timesteps, torch.tensor([1000.0, 500.0, 12.345]))
    assert sched.sigmas.dtype == torch.float32
    assert sched.sigmas.tolist() == pytest.approx([1.0, 0.5, 0.012345, 0.0], rel=1e-6)
    with _raises("custom sigmas [1.0, 0.5, 0.0201] cannot be honoured: the searched 3-step schedule runs its fitted "
                 "sigmas [1.0, 0.5, 0.0123]; pass no sigmas (or the pipeline's default)"):
        sched.set_timesteps(sigmas=[1.0, 0.5, 0.02013])
    with _raises("custom sigmas [1.0, 1.0, 0.0] cannot be honoured: the searched 3-step schedule runs its fitted "
                 "sigmas [1.0, 0.5, 0.0123]; pass no sigmas (or the pipeline's default)"):
        sched.set_timesteps(sigmas=[1, 1, 0])  # integers, shown as the floats they are compared as
    # the default grid of many steps ends at a small sigma too: 1/100 ± 5e-7 is the default grid
    n = 100
    many = OLSSSchedule([1000.0 - 9.0 * j for j in range(n)], list(range(n)), torch.eye(n, n + 1, dtype=torch.float64),
                        teacher_steps=n, prediction_type="flow")
    sched = OLSSScheduler.from_schedules([many], config=FlowMatchEulerDiscreteScheduler().config)
    grid = np.linspace(1.0, 1 / n, n)
    grid[-1] += 5e-7
    sched.set_timesteps(sigmas=grid)
    assert sched.running_searched_schedule


def test_flow_mu_is_compared_only_when_both_sides_have_one(caplog):
    """A mu given at use is compared with the fitted one (another mu runs, with a one-time warning); a schedule
    without a fitted mu, or a call without mu (no dynamic shifting), is not compared. A flow-matching scheduler
    never warns about DDIM's clipping options (its config carries DDIM's default clip_sample=True, which its
    fallback, FlowMatchEuler, does not have)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _flow().set_timesteps(3, mu=1.21)  # nothing fitted: nothing to compare
        _flow(fitted_for={"mu": 0.8}).set_timesteps(3)  # no mu at use (no dynamic shifting): nothing to compare
        sched = _flow(fitted_for={"mu": 0.8}, use_dynamic_shifting=True)
        sched.set_timesteps(3, mu=0.8)
        assert not [r for r in caplog.records if "mu" in r.getMessage() or "not applied" in r.getMessage()]
        sched.set_timesteps(3, mu=1.23)
    assert [r.getMessage() for r in caplog.records if "mu =" in r.getMessage()] == [
        "the 3-step schedule was fitted at mu = 0.8 but runs at mu = 1.23 at this image size; it runs unchanged, "
        "tuned for 0.8 (search a schedule at this setting for the best quality)"]
    assert torch.equal(sched.timesteps, torch.tensor([1000.0, 500.0, 12.345]))


@pytest.mark.parametrize("option, what", [(dict(clip_sample=True), "clip_sample"),
                                          (dict(thresholding=True, prediction_type="sample"), "thresholding")])
def test_clipping_configs_warn_once_with_their_text(caplog, option, what):
    cfg = dict(option)
    prediction_type = cfg.pop("prediction_type", "epsilon")
    s = OLSSSchedule([999, 666], [0, 3], _coeffs(2), teacher_steps=10, prediction_type=prediction_type)
    sched = OLSSScheduler.from_schedules([s], config=_config(prediction_type=prediction_type, **cfg))
    sched.checked_for = {"test": True}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sched.set_timesteps(2)
        sched.set_timesteps(2)
    said = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
    assert said == [f"{what}=True in the scheduler config is not applied by the searched 2-step OLSS schedule: it "
                    "runs the unclipped linear combination it was fitted on (step counts without a searched schedule "
                    "run DDIM, which applies it)"]
    s3 = OLSSSchedule([999, 666, 333], [0, 3, 6], _coeffs(3), teacher_steps=10, prediction_type=prediction_type)
    sched = OLSSScheduler.from_schedules([s, s3], config=_config(prediction_type=prediction_type, **cfg))
    sched.checked_for = {"test": True}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for n in (2, 3, 2, 3):
            sched.set_timesteps(n)
    said = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
    assert [m.split("searched ")[1][:6] for m in said] == ["3-step"]  # once per step count (2 was said above)


def test_an_unchecked_scheduler_says_so_once_and_a_checked_one_never(caplog):
    s = OLSSSchedule([999, 666, 333], [0, 3, 6], _coeffs(3), teacher_steps=10)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        unchecked = OLSSScheduler.from_schedules([s], config=_config())
        unchecked.set_timesteps(3)
        unchecked.set_timesteps(3)
        _scheduler().set_timesteps(3)
    assert [r.getMessage() for r in caplog.records if "use_olss_scheduler" in r.getMessage()] == [UNCHECKED]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        OLSSScheduler.from_schedules([s], config=_config()).set_timesteps(3)  # another scheduler: says it again
    assert [r.getMessage() for r in caplog.records if "use_olss_scheduler" in r.getMessage()] == [UNCHECKED]


def test_ddim_schedule_is_labelled_and_bounded():
    sched = _scheduler()
    one = sched.ddim_schedule(1)
    assert one.num_steps == 1 and one.indices == [0] and one.teacher_steps == 1
    d = sched.ddim_schedule(4)
    assert d.path == "ddim" and d.teacher == "DDIMScheduler (own coefficients)" and d.refined is False
    assert d.fitted_for == {"noise_schedule": sched.noise_schedule_id()} and d.teacher_steps == 4
    assert d.prediction_type == "epsilon" and d.timesteps == [999, 749, 499, 249]
    with _raises("num_inference_steps must be a positive integer, got 0"):
        sched.ddim_schedule(0)
    with _raises("ddim_schedule is for VP noise schedules; this scheduler is flow matching"):
        _flow().ddim_schedule(3)
