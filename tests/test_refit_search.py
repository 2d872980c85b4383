"""The path search judged after the re-fit (refine.refit_path_search, path="refit"): never worse than uniform on its own
objective, which is the student's true final error (checked by running OLSSScheduler through the pipeline); the
programme with the re-fit inside against brute force; the entry points' errors."""
import pytest
import torch

from olss_fast import FitConfig, OLSSScheduler, fit_olss_scheduler, refine_schedule, search_schedule
from olss_fast.cli import main
from olss_fast.models.gmm import make_gmm
from olss_fast.fit.recording import record_trajectories
from olss_fast.fit.work import make_work_items
from olss_fast.core.grid import programme_grid, programme_states
from olss_fast.core.refine import refit_path_search, refit_programme
from olss_fast.core.search import uniform_path


@pytest.fixture(scope="module")
def recorded():
    pipe = make_gmm((2, 4, 4), num_components=3, seed=0)
    pipe.set_progress_bar_config(disable=True)
    items = make_work_items([None] * 40)
    kept = []
    stats = record_trajectories(pipe, [None] * 40, teacher_steps=30, batch_size=40, progress=False, items=items,
                                on_batch=lambda it, x, e: kept.append(x))
    return pipe, stats, kept[0]


def student_mse(pipe, schedule, x0, target):
    """The student's final-latent MSE, run by OLSSScheduler through the pipeline (independent of the search)."""
    pipe.scheduler = OLSSScheduler.from_schedules([schedule], config=dict(pipe.scheduler.config))
    out = pipe(prompt=x0.shape[0], latents=x0.clone(), num_inference_steps=schedule.num_steps).sample
    return float((out.double() - target.double()).pow(2).mean())


@pytest.mark.parametrize("n", [3, 5])
def test_refit_search_never_worse_than_uniform_on_its_objective(recorded, n):
    pipe, stats, x_path = recorded
    den = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    res = refit_path_search(stats.timesteps, x_path[0], x_path, den, n, sweeps=2, progress=False)
    assert len(res.indices) == n and res.indices[0] == 0 and res.indices == sorted(set(res.indices))
    assert res.error <= res.start_error and res.error <= res.proposal_error
    # the objective is the final error of the re-fitted student, measured independently by sampling with it
    found = refine_schedule(search_schedule(stats, n, path=res.indices), den, x_path[0], x_path, progress=False)
    uniform = refine_schedule(search_schedule(stats, n), den, x_path[0], x_path, progress=False)
    found_mse = student_mse(pipe, found, x_path[0], x_path[-1])
    uniform_mse = student_mse(pipe, uniform, x_path[0], x_path[-1])
    assert found_mse == pytest.approx(res.error, rel=1e-3)
    assert uniform_mse == pytest.approx(res.start_error, rel=1e-3)
    assert found_mse <= uniform_mse * (1 + 1e-6)
    # and the search moved: on this mixture the uniform path is not a coordinate-wise optimum
    assert res.indices != uniform_path(30, n) and res.error < 0.9 * res.start_error
    assert res.evaluations < res.paths_tried * n  # tries re-use the model outputs of the unchanged prefix


def test_programme_is_exact_for_two_steps_and_reports_the_refit_error(recorded):
    """With two steps every path [0, i] is a state of the programme, so its proposal must be the best by brute force
    over all of them (each judged by a fresh re-fit); for more steps the error it reports for its proposal is the
    re-fit's final error on that path."""
    pipe, stats, x_path = recorded
    den = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    prop, evaluations = refit_programme(stats.timesteps, x_path[0], x_path, den, [2, 4], progress=False)
    assert evaluations <= 1 + 3 * 29
    errs = {i: refine_schedule(search_schedule(stats, 2, path=[0, i]), den, x_path[0], x_path,
                               progress=False).errors[-1] for i in range(1, 30)}
    best = min(errs, key=errs.get)
    assert prop[2][0] == [0, best] and prop[2][1] == pytest.approx(errs[best], rel=1e-9)
    assert max(errs.values()) > 2 * errs[best]
    path4, err4 = prop[4]
    assert len(path4) == 4 and path4[0] == 0
    redo = refine_schedule(search_schedule(stats, 4, path=path4), den, x_path[0], x_path, progress=False)
    assert err4 == pytest.approx(redo.errors[-1], rel=1e-9)


def test_programme_with_batched_layers_is_the_programme(recorded):
    """``batched`` (one call per layer, here the mixture's model with per-row timesteps) gives the proposals, errors
    and evaluation count of one ``denoise`` call per state, and is called once per layer with every state of it."""
    pipe, stats, x_path = recorded
    den = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    calls = []

    def batched(zs, ts):
        calls.append(list(ts))
        t = torch.tensor([t for t in ts for _ in range(zs[0].shape[0])])
        return list(pipe.unet(torch.cat(zs), t).sample.split(zs[0].shape[0]))

    def no_single(x, t):
        raise AssertionError("denoise called although batched was given")

    ref, ref_evals = refit_programme(stats.timesteps, x_path[0], x_path, den, [2, 4], stride=2, progress=False)
    got, evals = refit_programme(stats.timesteps, x_path[0], x_path, no_single, [2, 4], stride=2, progress=False,
                                 batched=batched)
    assert evals == ref_evals == sum(len(ts) for ts in calls) and len(calls) == 4
    assert calls[0] == [stats.timesteps[0]] and len(calls[1]) > 1 and len(set(calls[1])) == len(calls[1])
    for n in (2, 4):
        assert got[n][0] == ref[n][0] and got[n][1] == pytest.approx(ref[n][1], rel=1e-5)
    with pytest.raises(ValueError, match="batched returned 0 model outputs for the 1 states of layer 0"):
        refit_programme(stats.timesteps, x_path[0], x_path, den, [2], progress=False, batched=lambda zs, ts: [])


def test_programme_with_more_states_before_the_last_step(recorded):
    """final_states: the layer before the last step keeps that many states per node. For three steps only layer 2
    is widened (layer 1 holds the exact paths [0, i]), so more states are a superset of fewer: the final error never
    rises with final_states, and keeping every state is exact, the best of all paths [0, i, j] on the stride-3 grid by
    brute force (each judged by a fresh re-fit). On this mixture one state per node is far from it. Each programme
    costs programme_states evaluations, and batched layers (two states of a node share its timestep) give the same."""
    pipe, stats, x_path = recorded
    den = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    grid = programme_grid(30, 3)[1:]
    brute = {(0, i, j): refine_schedule(search_schedule(stats, 3, path=[0, i, j]), den, x_path[0], x_path,
                                        progress=False).errors[-1] for i in grid for j in grid if j > i}
    best = min(brute, key=brute.get)
    found = {}
    for width in (1, 2, 3, len(grid)):
        out, evals = refit_programme(stats.timesteps, x_path[0], x_path, den, [3], stride=3, progress=False,
                                     final_states=width)
        assert evals == programme_states(30, [3], 3, width)
        path, err = out[3]
        assert err == pytest.approx(brute[tuple(path)], rel=1e-9)
        found[width] = err
    assert found[len(grid)] == pytest.approx(brute[best], rel=1e-9)
    assert found[1] >= found[2] >= found[3] >= found[len(grid)] and found[1] > 2 * found[len(grid)]

    def batched(zs, ts):
        t = torch.tensor([t for t in ts for _ in range(zs[0].shape[0])])
        return list(pipe.unet(torch.cat(zs), t).sample.split(zs[0].shape[0]))

    ref, ref_evals = refit_programme(stats.timesteps, x_path[0], x_path, den, [3, 5], stride=2, progress=False,
                                     final_states=2)
    got, evals = refit_programme(stats.timesteps, x_path[0], x_path, den, [3, 5], stride=2, progress=False,
                                 final_states=2, batched=batched)
    assert evals == ref_evals == programme_states(30, [3, 5], 2, 2) > programme_states(30, [3, 5], 2)
    for n in (3, 5):
        assert got[n][0] == ref[n][0] and got[n][1] == pytest.approx(ref[n][1], rel=1e-5)
    with pytest.raises(ValueError, match="final_states must be a positive integer, got 0"):
        refit_programme(stats.timesteps, x_path[0], x_path, den, [3], progress=False, final_states=0)


def test_refit_search_from_a_start_and_with_no_sweeps(recorded):
    pipe, stats, x_path = recorded
    den = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    start = [0, 2, 20]
    res = refit_path_search(stats.timesteps, x_path[0], x_path, den, 3, start=start, programme=False, sweeps=0,
                            progress=False)
    uniform = refine_schedule(search_schedule(stats, 3), den, x_path[0], x_path, progress=False).errors[-1]
    started = refine_schedule(search_schedule(stats, 3, path=start), den, x_path[0], x_path,
                              progress=False).errors[-1]
    assert res.proposal is None and res.evaluations == 6
    assert res.indices == (start if started < uniform else uniform_path(30, 3))
    assert res.error == pytest.approx(min(started, uniform), rel=1e-12)


def test_fit_with_path_refit(recorded):
    pipe = make_gmm((2, 4, 4), num_components=3, seed=0)
    res = fit_olss_scheduler(pipe, [None] * 24, teacher_steps=20, num_steps=(3, 4), batch_size=12,
                             path="refit", search_samples=12, progress=False)
    for n, sched in res.schedules.items():
        paper = res.paper_schedules[n]
        assert sched.path == "refit" and sched.refined and sched.indices == paper.indices and not paper.refined
        info, held = sched.meta["refit_search"], sched.meta["heldout"]
        assert info["samples"] == 12 and held["heldout_samples"] == 6 and info["candidate"] == held["chosen"]
        errors = {k: v for k, v in held["errors"].items() if k != "baseline"}
        passing = {k: held["pooled"][k] for k, v in errors.items() if v is not None and v <= held["errors"]["baseline"]}
        assert set(errors) == {"proposal", "minimax", "uniform"} and held["chosen"] == min(passing, key=passing.get)
    assert res.scheduler.available_steps == [3, 4]


def test_refit_path_errors(recorded):
    pipe, stats, x_path = recorded
    den = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    with pytest.raises(ValueError, match=r"integers in \[1, 30\]"):
        refit_path_search(stats.timesteps, x_path[0], x_path, den, 31, progress=False)
    with pytest.raises(ValueError, match=r"integers in \[1, 30\]"):
        refit_path_search(stats.timesteps, x_path[0], x_path, den, [3, 0], progress=False)
    with pytest.raises(ValueError, match="T\\+1"):
        refit_path_search(stats.timesteps, x_path[0], x_path[:-1], den, 3, progress=False)
    with pytest.raises(ValueError, match="initial latent"):
        refit_path_search(stats.timesteps, torch.randn_like(x_path[0]), x_path, den, 3, progress=False)
    with pytest.raises(ValueError, match="start must be"):
        refit_path_search(stats.timesteps, x_path[0], x_path, den, 3, start=[0, 5, 5], progress=False)
    with pytest.raises(ValueError, match="sweeps"):
        refit_path_search(stats.timesteps, x_path[0], x_path, den, 3, sweeps=-1, progress=False)
    for option in ({"stride": 2}, {"final_states": 2}):  # options of the programme it would not run
        with pytest.raises(ValueError, match="size the programme, which programme=False does not run"):
            refit_path_search(stats.timesteps, x_path[0], x_path, den, 3, programme=False, progress=False, **option)
    with pytest.raises(ValueError, match="fewer than"):
        refit_path_search(stats.timesteps, x_path[0][:1, :1, :1, :2], x_path[:, :1, :1, :1, :2], den, 3,
                          progress=False)
    with pytest.raises(ValueError, match="runs the model: use fit_olss_scheduler"):
        search_schedule(stats, 3, path="refit")
    with pytest.raises(ValueError, match="cannot be combined with refine=False"):
        FitConfig(path="refit", refine=False)
    with pytest.raises(ValueError, match="search_samples"):
        FitConfig(path="refit", search_samples=0)
    with pytest.raises(ValueError, match="search_sweeps"):
        FitConfig(search_sweeps=-1)
    assert FitConfig(refine=False).path == "uniform"  # the default without the re-fit is a statistics path


def test_cli_refuses_refit_without_the_refit(tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('["3"]')
    rc = main(["search", "--pipeline", "digits", "--prompts", str(prompts), "--out", str(tmp_path / "o"),
               "--path", "refit", "--no-refine", "--teacher-steps", "4", "--steps", "2", "--quiet"])
    assert rc != 0
    assert "--path refit judges each path by the error after the re-fit: it cannot be combined with --no-refine" \
        in capsys.readouterr().err


def test_programme_stride_places_steps_on_the_coarse_grid_and_stays_never_worse_than_uniform(recorded):
    """stride=3: every proposed index is a multiple of 3 or T - 1, T - 2 (the grid), the programme costs as many
    model evaluations as programme_states counts, fewer than on the full
    grid, its reported error is the re-fit's on that path, and the search still keeps uniform when it is better."""
    pipe, stats, x_path = recorded
    den = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    full, full_evals = refit_programme(stats.timesteps, x_path[0], x_path, den, [3, 5], progress=False)
    coarse, coarse_evals = refit_programme(stats.timesteps, x_path[0], x_path, den, [3, 5], stride=3,
                                           progress=False)
    assert coarse_evals < 0.5 * full_evals
    assert (full_evals, coarse_evals) == (programme_states(30, [3, 5], 1), programme_states(30, [3, 5], 3))
    assert programme_grid(30, 3) == list(range(0, 30, 3)) + [28, 29]
    for n in (3, 5):
        path, err = coarse[n]
        assert len(path) == n and path[0] == 0 and all(i % 3 == 0 or i >= 28 for i in path) and path == sorted(set(path))
        redo = refine_schedule(search_schedule(stats, n, path=path), den, x_path[0], x_path, progress=False)
        assert err == pytest.approx(redo.errors[-1], rel=1e-9)
    res = refit_path_search(stats.timesteps, x_path[0], x_path, den, [3, 5], stride=3, progress=False)
    for n in (3, 5):
        assert res[n].error <= res[n].start_error and res[n].proposal == coarse[n][0]
    with pytest.raises(ValueError, match="stride must be a positive integer leaving at least 8"):
        refit_programme(stats.timesteps, x_path[0], x_path, den, [8], stride=8, progress=False)
    with pytest.raises(ValueError, match="stride"):
        refit_programme(stats.timesteps, x_path[0], x_path, den, [3], stride=0, progress=False)
    with pytest.raises(ValueError, match="search_stride"):
        FitConfig(search_stride=0)


def test_refit_search_judges_a_start_per_step_count(recorded):
    """fit_olss_scheduler passes the min-max path of every step count as a start: the result is never worse than
    either that path or uniform on the re-fit objective, judged by an independent re-fit."""
    pipe, stats, x_path = recorded
    den = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    starts = {n: search_schedule(stats, n, path="minimax").indices for n in (3, 5)}
    res = refit_path_search(stats.timesteps, x_path[0], x_path, den, [3, 5], start=starts, programme=False,
                            progress=False)
    for n in (3, 5):
        errs = [refine_schedule(search_schedule(stats, n, path=p), den, x_path[0], x_path, progress=False).errors[-1]
                for p in (starts[n], uniform_path(30, n))]
        assert res[n].error == pytest.approx(min(errs), rel=1e-9)
        assert res[n].indices == (starts[n] if errs[0] < errs[1] else uniform_path(30, n))
    with pytest.raises(ValueError, match="not searched"):
        refit_path_search(stats.timesteps, x_path[0], x_path, den, [3], start={4: [0, 1, 2, 3]}, progress=False)
    with pytest.raises(ValueError, match="single start path needs a single step count"):
        refit_path_search(stats.timesteps, x_path[0], x_path, den, [3, 5], start=[0, 1, 2], progress=False)
    with pytest.raises(ValueError, match="start must be 5 teacher indices"):
        refit_path_search(stats.timesteps, x_path[0], x_path, den, [3, 5], start={5: [0, 1, 2]}, progress=False)


def test_search_options_need_the_refit_path():
    with pytest.raises(ValueError, match="search_stride only apply to path='refit'"):
        FitConfig(path="uniform", search_stride=2)
    with pytest.raises(ValueError, match="search_samples, search_sweeps only apply to path='refit'"):
        FitConfig(refine=False, search_samples=4, search_sweeps=1)
    assert FitConfig(search_stride=2, search_samples=4).path == "refit"


def test_spread_indices_cover_first_and_last():
    from olss_fast.fit.work import spread_indices

    assert spread_indices(10, 4) == [0, 3, 6, 9]
    assert spread_indices(3, 5) == [0, 1, 2]
    assert spread_indices(5, 1) == [0]
    assert spread_indices(100, 25)[-1] == 99 and len(spread_indices(100, 25)) == 25
