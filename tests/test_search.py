"""Path search and fit invariants on Gaussian-mixture teachers; clear errors for bad input."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from olss_fast import GramStats, OLSSSchedule, search_schedule
from olss_fast.models.gmm import make_gmm
from olss_fast.fit.recording import record_trajectories
from olss_fast.core.search import coefficient_errors, uniform_path
from olss_fast.core.step import ddim_coefficients
from helpers import assert_fit_errors_optimal, assert_same_fit


def record_gmm(seed, components=3, shape=(2, 3, 3), samples=24, T=30):
    pipe = make_gmm(shape, num_components=components, seed=seed)
    stats = record_trajectories(pipe, [None] * samples, teacher_steps=T, batch_size=samples, progress=False,
                                base_seed=seed)
    return pipe, stats


def ddim_on_path(pipe, stats, indices):
    ts = [stats.timesteps[i] for i in indices]
    prev = ts[1:] + [-1]
    sch = pipe.scheduler
    return ddim_coefficients(sch.alphas_cumprod, ts, prev, float(sch.final_alpha_cumprod), "epsilon")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), components=st.integers(1, 4), n=st.integers(2, 8))
def test_fit_never_worse_than_ddim_on_same_path(seed, components, n):
    pipe, stats = record_gmm(seed, components)
    sched = search_schedule(stats, n, path="uniform")
    ddim_err = coefficient_errors(stats, sched.indices, ddim_on_path(pipe, stats, sched.indices))
    for j, (ours, theirs) in enumerate(zip(sched.errors, ddim_err)):
        assert ours <= theirs * (1 + 1e-9) + 1e-15, (j, ours, theirs)
    # and DDIM's coefficients are not trivially optimal: on some step the fit is strictly better
    assert min(o / max(t, 1e-30) for o, t in zip(sched.errors, ddim_err)) < 0.999


def test_coefficient_errors_of_fitted_coeffs_equal_reported_errors():
    _, stats = record_gmm(5)
    sched = search_schedule(stats, 5)
    # the reported errors (from the solve) equal the errors of the coefficients evaluated on the statistics
    assert_fit_errors_optimal(stats, sched.indices, sched.coeffs, sched.errors)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [3, 5, 8])
def test_minimax_never_worse_than_uniform_on_its_own_criterion(seed, n):
    _, stats = record_gmm(seed, T=40)
    mm = search_schedule(stats, n, path="minimax")
    uni = search_schedule(stats, n, path="uniform")
    assert max(mm.errors) <= max(uni.errors) * (1 + 1e-12)
    assert mm.indices[0] == 0 and len(mm.indices) == n
    assert mm.timesteps == [stats.timesteps[i] for i in mm.indices]


def test_minimax_bound_is_tight():
    """The greedy walk reaches the end within n steps at the bound found, and not at a slightly smaller bound."""
    from olss_fast.core.search import _Fitter, _greedy, minimax_path

    _, stats = record_gmm(7, components=3, T=40)
    fitter = _Fitter(stats, "global")
    path = minimax_path(fitter, 4)
    bound = max(fitter.path_fit(path)[1])
    assert _greedy(fitter, 4, bound * (1 + 1e-9)) is not None
    assert _greedy(fitter, 4, bound * (1 - 1e-3)) is None
    assert len(path) == 4 and path[0] == 0


def test_channel_granularity_not_worse_than_global_on_training_data():
    _, stats = record_gmm(3)
    g = search_schedule(stats, 6, granularity="global")
    c = search_schedule(stats, 6, granularity="channel")
    assert c.coeffs.shape == (2, 6, 7)
    for a, b in zip(c.errors, g.errors):
        assert a <= b * (1 + 1e-9)


def test_uniform_path_formula():
    assert uniform_path(100, 10) == list(range(0, 100, 10))
    assert uniform_path(60, 7) == [0, 9, 17, 26, 34, 43, 51]
    assert uniform_path(5, 5) == [0, 1, 2, 3, 4]


def test_bad_requests_raise_value_error():
    _, stats = record_gmm(1, samples=4, T=10)
    with pytest.raises(ValueError, match="must be <= teacher steps"):
        search_schedule(stats, 11)
    with pytest.raises(ValueError, match="positive integer"):
        search_schedule(stats, 0)
    with pytest.raises(ValueError, match="unknown path"):
        search_schedule(stats, 3, path="fastest")
    with pytest.raises(ValueError, match="unknown granularity"):
        search_schedule(stats, 3, granularity="pixel")
    with pytest.raises(ValueError, match="no samples"):
        search_schedule(GramStats([3, 2, 1], prediction_type="epsilon"), 2)


def test_too_few_samples_for_the_unknowns_is_a_clear_error():
    stats = GramStats(list(range(20))[::-1], prediction_type="epsilon")
    g = torch.Generator().manual_seed(0)
    stats.update(torch.randn(21, 1, 1, 4, generator=g), torch.randn(20, 1, 1, 4, generator=g))  # 4 equations
    search_schedule(stats, 3)  # 4 unknowns: fine
    with pytest.raises(ValueError, match="fewer equations"):
        search_schedule(stats, 5)


def test_update_rejects_bad_trajectories():
    stats = GramStats([3, 2, 1], prediction_type="epsilon")
    with pytest.raises(ValueError, match="3-step teacher"):
        stats.update(torch.randn(3, 2, 4, 1), torch.randn(3, 2, 4, 1))
    with pytest.raises(ValueError, match="disagree"):
        stats.update(torch.randn(4, 2, 4, 1), torch.randn(3, 3, 4, 1))
    x = torch.randn(4, 2, 4, 1)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        stats.update(x, torch.randn(3, 2, 4, 1))
    stats.update(torch.randn(4, 2, 4, 1), torch.randn(3, 2, 4, 1))
    with pytest.raises(ValueError, match="sample shape"):
        stats.update(torch.randn(4, 2, 4, 2), torch.randn(3, 2, 4, 2))
    with pytest.raises(ValueError, match="duplicates"):
        GramStats([5, 5, 3], prediction_type="epsilon")


def test_comparison_helpers_catch_a_different_fit():
    """The tolerances of assert_same_fit / assert_fit_errors_optimal are tight enough to see a wrong coefficient."""
    _, stats = record_gmm(3)
    sched = search_schedule(stats, 5)
    assert_same_fit(stats, sched, sched, 0.0)
    bad = sched.coeffs.clone()
    bad[2, 1] *= 1 + 1e-5
    wrong = OLSSSchedule(timesteps=sched.timesteps, indices=sched.indices, coeffs=bad,
                         teacher_steps=sched.teacher_steps)
    with pytest.raises(AssertionError, match="step 2"):
        assert_same_fit(stats, wrong, sched, 1e-15)
    with pytest.raises(AssertionError, match="step 2"):
        assert_fit_errors_optimal(stats, sched.indices, bad, sched.errors)


def test_paper_fit_coefficients_are_the_float64_least_squares_solution_bit_for_bit():
    """Regression: the coefficients of a path held in a float32 buffer (rounded before the schedule stores them as
    float64): each row must be exactly ``gram_lstsq``'s float64 solution on the teacher statistics."""
    from olss_fast.core.lstsq import gram_lstsq

    _, stats = record_gmm(3)
    sched = search_schedule(stats, 4)
    g = stats.global_gram()
    targets = list(sched.indices[1:]) + [stats.num_teacher_steps]
    for j in range(4):
        basis = [stats.x_index(0)] + [stats.e_index(i) for i in sched.indices[: j + 1]]
        coef, _ = gram_lstsq(g.unsqueeze(0), basis, stats.x_index(targets[j]))
        assert torch.equal(sched.coeffs[j, : j + 2], coef[0]), j
        assert sched.coeffs.dtype == torch.float64 and not torch.equal(coef[0].float().double(), coef[0])


def test_search_schedule_warns_once_naming_itself_and_the_refit(caplog):
    import logging

    _, stats = record_gmm(4)
    with caplog.at_level(logging.WARNING):
        search_schedule(stats, 3)
        search_schedule(stats, 4)
    said = [r.getMessage() for r in caplog.records if "paper's fit" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        "search_schedule returns the paper's fit (OLSS Eq. 9-10: coefficients fitted on the teacher's own model "
        "outputs) without the student-in-the-loop re-fit")


def test_search_schedule_honours_a_config_object_and_one_step_minimax():
    """Regression: a ``SearchConfig`` passed as ``config=`` ignored (the keywords' defaults used instead), and the
    min-max search failing for one step, whose only path is [0] (admissible at exactly its own error)."""
    from olss_fast.core.search import SearchConfig, _Fitter, minimax_path

    _, stats = record_gmm(6, T=40)
    by_config = search_schedule(stats, 5, config=SearchConfig(path="minimax", granularity="channel"))
    by_keywords = search_schedule(stats, 5, path="minimax", granularity="channel")
    assert by_config.granularity == "channel" and by_config.indices == by_keywords.indices
    assert by_config.path == by_keywords.path and torch.equal(by_config.coeffs, by_keywords.coeffs)
    assert search_schedule(stats, 5, config=SearchConfig(path=(0, 1, 2, 3, 4))).indices == [0, 1, 2, 3, 4]
    assert minimax_path(_Fitter(stats, "global"), 1) == [0]


def test_paper_schedule_fields_refusals_and_collinearity_note(caplog):
    """What the statistics-only fit records (teacher steps, prediction type, teacher, meta, not refined), its
    refusals with their messages, and the note it logs when the path's basis vectors are collinear in the data (here
    a model whose output is its input: e_i = x_i), and only then."""
    import logging
    import re

    from olss_fast.core.search import SearchConfig, paper_schedule

    _, stats = record_gmm(7)
    s = paper_schedule(stats, 3)
    assert (s.teacher_steps, s.prediction_type, s.teacher, s.refined) == (30, stats.prediction_type, stats.teacher,
                                                                           False)
    assert s.meta == {"num_samples": 24, "model": stats.model} and s.path == "uniform"
    with pytest.raises(ValueError, match=r"^stats must be GramStats, got dict$"):
        paper_schedule({}, 3)
    with pytest.raises(ValueError, match=re.escape("unknown option(s) ['paths'] of the search; SearchConfig takes "
                                                   "['bisection_iters', 'granularity', 'path']")):
        paper_schedule(stats, 3, paths="uniform")
    with pytest.raises(ValueError, match=re.escape("pass search options in config=SearchConfig(...) or as keywords, "
                                                   "not both (['path'])")):
        paper_schedule(stats, 3, config=SearchConfig(), path="uniform")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 2, 3, generator=g, dtype=torch.float64)
    echo = GramStats([800, 600, 400, 200], teacher="echo", prediction_type="epsilon")
    echo.update(x, x[:4].clone(), items=[0, 1, 2, 3])
    with caplog.at_level(logging.INFO, logger="olss_fast.core.search"):
        caplog.clear()
        paper_schedule(stats, 3)
        assert not [r for r in caplog.records if "collinear" in r.getMessage()]
        paper_schedule(echo, 2)
    assert [r.getMessage() for r in caplog.records if "collinear" in r.getMessage()] == [
        "the 3 basis vectors of this path are numerically collinear (rank 2) in the recorded data; using "
        "minimum-norm coefficients where needed"]
