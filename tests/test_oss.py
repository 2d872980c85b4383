"""OSS baselines (olss_fast/core/oss.py): the dynamic programme against brute force over every path, its solver steps
against diffusers' own schedulers, the diffusers runner of its timesteps, and bad input."""
import itertools
import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from olss_fast.fit.baselines import CustomTimestepsScheduler, fit_oss_baselines, oss_scheduler, sample
from olss_fast.models.gmm import GMMDenoiser, GMMPipeline, make_gmm
from olss_fast.core.oss import OSSResult, oss_search, run_path

S = 0.5  # std of the centred Gaussian


def trailing_ddim(T, set_alpha_to_one=True):
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=set_alpha_to_one,
                          timestep_spacing="trailing")
    sched.set_timesteps(T)
    return sched


@pytest.fixture(scope="module")
def gaussian():
    """A centred isotropic Gaussian N(0, S²): exact denoiser, exact ODE solution at the nodes of a 12-step grid."""
    sched = trailing_ddim(12)
    unet = GMMDenoiser(torch.zeros(1, 1, 2, 3), torch.tensor([S]), torch.tensor([1.0]), sched.alphas_cumprod)
    pipe = GMMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    ts = [int(t) for t in sched.timesteps]
    ac = sched.alphas_cumprod.double()
    abars = [float(ac[t]) for t in ts] + [1.0]
    x0 = torch.randn(5, 1, 2, 3, generator=torch.Generator().manual_seed(0))

    def exact(ab):  # x̄ = x/√ᾱ follows √(S² + σ̄²)·const along the probability-flow ODE (σ̄² = (1−ᾱ)/ᾱ)
        grow = lambda a: math.sqrt(a) * math.sqrt(S * S + (1 - a) / a)  # noqa: E731
        return x0.double() * grow(ab) / grow(abars[0])

    ref = torch.stack([exact(a) for a in abars]).float()
    return pipe, ts, abars, x0, ref


def diffusers_final_mse(pipe, solver, ts, path, x0, target):
    """Run diffusers' scheduler of ``solver`` on the path's timesteps through the pipeline (independent of oss.py)."""
    n = len(path)
    res = OSSResult(solver, {n: list(path)}, {n: [ts[i] for i in path]}, {}, ts)
    pipe.scheduler = oss_scheduler(res, dict(trailing_ddim(12).config))
    out = pipe(prompt=x0.shape[0], latents=x0.clone(), num_inference_steps=n).sample
    return float((out.double() - target.double()).pow(2).mean())


def test_ddim_programme_finds_the_brute_force_optimum(gaussian):
    """On a centred Gaussian with the exact ODE as reference, DDIM's error at a node grows monotonically with the
    error it starts from (positive step factors; Euler under-shoots the convex solution √(S² + σ̄²)), so the
    programme's recursion is exact: its path must be the best of all C(11, n−1) paths, found here by running
    diffusers' scheduler on every one of them."""
    pipe, ts, abars, x0, ref = gaussian
    den = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    res = oss_search(den, ref, ts, abars, [2, 3, 4, 5], "ddim", progress=False)
    assert res.evaluations <= 5 * 12
    for n in (2, 3, 4, 5):
        errs = {(0, *mid): diffusers_final_mse(pipe, "ddim", ts, (0, *mid), x0, ref[-1])
                for mid in itertools.combinations(range(1, 12), n - 1)}
        best = min(errs, key=errs.get)
        assert tuple(res.indices[n]) == best, (n, res.indices[n], best)
        assert res.errors[n] == pytest.approx(errs[best], rel=1e-4)
        assert res.timesteps[n] == [ts[i] for i in best]
        # not a degenerate case: the worst path is far worse
        assert max(errs.values()) > 2 * errs[best]


def test_dpmsolver_programme_two_steps_exact_and_steps_equal_diffusers(gaussian):
    """DPM-Solver++(2M): with two steps every path is a candidate of the programme, so it must find the best one;
    for more steps its recursion is OSS's approximation (never better than the best path), and the error it reports
    for its path is what diffusers' DPMSolverMultistepScheduler gives on those timesteps."""
    pipe, ts, abars, x0, ref = gaussian
    den = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    res = oss_search(den, ref, ts, abars, [2, 3, 4], "dpmsolver++", progress=False)
    for n in (2, 3, 4):
        errs = {(0, *mid): diffusers_final_mse(pipe, "dpmsolver++", ts, (0, *mid), x0, ref[-1])
                for mid in itertools.combinations(range(1, 12), n - 1)}
        best = min(errs.values())
        mine = diffusers_final_mse(pipe, "dpmsolver++", ts, res.indices[n], x0, ref[-1])
        assert res.errors[n] == pytest.approx(mine, rel=1e-4)
        assert mine >= best * (1 - 1e-6)
        if n == 2:
            assert mine == pytest.approx(best, rel=1e-6)
    # the step arithmetic of run_path (the programme's) equals diffusers' on arbitrary paths
    for path in ([0, 3, 7, 9], [0, 1, 2, 10, 11], [0, 6]):
        z = run_path(den, x0, ts, abars, path, "dpmsolver++")
        assert float((z.double() - ref[-1].double()).pow(2).mean()) == pytest.approx(
            diffusers_final_mse(pipe, "dpmsolver++", ts, path, x0, ref[-1]), rel=1e-4)


def test_first_order_dpmsolver_runner_is_ddim():
    """OSS-DDIM runs as first-order DPM-Solver++ with custom timesteps: on DDIM's own trailing grid it must give
    diffusers' DDIMScheduler's samples (step counts dividing 1000: for others DDIM's own step, t − 1000 // n, does not
    land on its next trailing timestep)."""
    pipe = make_gmm((2, 3, 3), num_components=3, seed=4)
    pipe.set_progress_bar_config(disable=True)
    cfg = dict(pipe.scheduler.config)
    x0 = torch.randn(16, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    for n in (4, 10):
        ddim = DDIMScheduler.from_config(cfg)
        ddim.set_timesteps(n)
        ts = [int(t) for t in ddim.timesteps]
        res = OSSResult("ddim", {n: list(range(n))}, {n: ts}, {}, ts)
        a = sample(pipe, DDIMScheduler.from_config(cfg), [None] * 16, x0, n)
        b = sample(pipe, oss_scheduler(res, cfg), [None] * 16, x0, n)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert (a - x0).abs().max() > 0.1  # it did sample


def test_fit_oss_baselines_reports_what_its_scheduler_does():
    """End to end on a mixture: the training error the programme reports equals diffusers' scheduler's error on the
    same noise against the same teacher, and the chosen path beats the solver on the teacher's uniform sub-grid."""
    pipe = make_gmm((2, 3, 3), num_components=3, seed=2)
    pipe.set_progress_bar_config(disable=True)
    out = fit_oss_baselines(pipe, [None] * 24, ("ddim", "dpmsolver++"), (3, 5), teacher_steps=20, batch_size=12,
                            progress=False)
    from olss_fast.fit.teacher import default_teacher
    from olss_fast.fit.work import item_noise, make_work_items

    x0 = item_noise(make_work_items([None] * 24), (2, 3, 3))
    teacher = sample(pipe, default_teacher(pipe.scheduler), [None] * 24, x0, 20)  # the reference OSS followed
    for solver, (res, sched) in out.items():
        assert isinstance(sched, CustomTimestepsScheduler) and sched.available_steps == [3, 5]
        assert res.evaluations <= 1 + 4 * 19
        for n in (3, 5):
            got = sample(pipe, sched, [None] * 24, x0, n)
            assert float((got.double() - teacher.double()).pow(2).mean()) == pytest.approx(res.errors[n], rel=2e-3)
            uniform = list(range(0, 20, 20 // n))[:n]
            base = OSSResult(solver, {n: uniform}, {n: [res.grid_timesteps[i] for i in uniform]}, {}, [])
            plain = sample(pipe, oss_scheduler(base, dict(pipe.scheduler.config)), [None] * 24, x0, n)
            assert res.errors[n] < float((plain.double() - teacher.double()).pow(2).mean())


def test_bad_input_is_refused(gaussian):
    pipe, ts, abars, x0, ref = gaussian
    den = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    with pytest.raises(ValueError, match="unknown solver"):
        oss_search(den, ref, ts, abars, 3, "heun", progress=False)
    with pytest.raises(ValueError, match="prediction_type"):
        oss_search(den, ref, ts, abars, 3, prediction_type="flow", progress=False)
    with pytest.raises(ValueError, match=r"\[13, B, \.\.\.\]"):
        oss_search(den, ref[:-1], ts, abars, 3, progress=False)
    with pytest.raises(ValueError, match="T\\+1 = 13"):
        oss_search(den, ref, ts, abars[:-1], 3, progress=False)
    with pytest.raises(ValueError, match="increase strictly"):
        oss_search(den, ref, ts, abars[::-1], 3, progress=False)
    with pytest.raises(ValueError, match=r"in \[1, 12\]"):
        oss_search(den, ref, ts, abars, [3, 13], progress=False)
    with pytest.raises(ValueError, match="NaN"):
        oss_search(lambda x, t: x * float("nan"), ref, ts, abars, 2, progress=False)
    runner = oss_scheduler(OSSResult("ddim", {3: [0, 4, 8]}, {3: [ts[0], ts[4], ts[8]]}, {}, ts),
                           dict(pipe.scheduler.config))
    with pytest.raises(ValueError, match=r"no timesteps for 4 steps; this sampler has \[3\]"):
        runner.set_timesteps(4)
    with pytest.raises(ValueError, match="strictly decreasing"):
        CustomTimestepsScheduler(DPMSolverMultistepScheduler(), {2: [10, 10]})
    gmm = make_gmm((2, 2, 2), num_components=2, seed=0)
    with pytest.raises(ValueError, match="unknown OSS solver"):
        fit_oss_baselines(gmm, [None] * 4, ("ddim", "unipc"), progress=False)
    with pytest.raises(ValueError, match="set_alpha_to_one=True"):
        fit_oss_baselines(gmm, [None] * 4, teacher=trailing_ddim(10, set_alpha_to_one=False), teacher_steps=10,
                          progress=False)
