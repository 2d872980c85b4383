"""OLSS path search and coefficient fit on Gram statistics (Duan et al. 2023, Algorithm 1 and Eq. 9–10).

A student path ``i_0 = 0 < i_1 < … < i_{n-1} < T`` selects teacher steps; student step j predicts the teacher latent
``x[i_{j+1}]`` (``i_n := T``) as ``w_j x[0] + Σ_{l≤j} v_{j,l} e[i_l]`` with coefficients fitted by least squares over
all recorded samples. Everything here reads only the Gram matrix of :class:`~olss_fast.core.stats.GramStats`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from olss_fast.core import checks
from olss_fast.core.lstsq import gram_lstsq, numerical_rank
from olss_fast.core.schedule import GRANULARITIES, OLSSSchedule
from olss_fast.core.stats import GramStats

logger = logging.getLogger(__name__)

#: paths :func:`search_schedule` computes from the statistics alone
STATS_PATHS = ("uniform", "minimax")
#: every path option of ``FitConfig.path`` / ``olss-fast search --path``; "refit" judges each path by the error after
#: the student-in-the-loop re-fit and needs the model (:func:`olss_fast.core.refine.refit_path_search`)
PATHS = STATS_PATHS + ("refit",)
#: The default path of :func:`search_schedule`, chosen on held-out quality (benchmarks/quality.py,
#: benchmarks/RESULTS.md "Quality"): with the re-fit, on the bundled digits model the uniform path is as good as or
#: better than the paper's minimax path (which mostly falls back to uniform there; 8 NFE: 0.0408 vs 0.0419 teacher
#: RMSE); on the Gaussian mixture the refined minimax path is better at 4–8 NFE (e.g. 0.082 vs 0.138 at 6 NFE against
#: the exact ODE). Without the re-fit the paper's fit on either path can blow up on held-out noise (GMM, 10–15 NFE).
#: Uniform stays the default: equal or better on the real model, and never worse than DDIM's own path.
DEFAULT_STATS_PATH = "uniform"
#: The default path of ``fit_olss_scheduler`` / the CLI (with the re-fit), chosen on held-out quality
#: (benchmarks/quality.py --part gmm14 / digits14; benchmarks/RESULTS.md, learned-step baselines): judging paths by the
#: error after the re-fit beat the re-fit on the uniform and the minimax path at every NFE from 4 to 10 on held-out
#: digits (e.g. 0.0544 vs 0.0779 teacher RMSE at 5 NFE, 0.0218 vs 0.0360 at 10) and was best or tied on the mixture for
#: training seed 1 (0.1032 vs 0.1436 at 5 NFE); on another training seed it kept a path that lost to minimax on held-out
#: noise at 8–10 NFE (RESULTS.md, "Robustness"). The programme costs about ``max(num_steps) × teacher_steps /
#: search_stride`` model evaluations of each search sample; ``fit_olss_scheduler`` sizes ``search_samples`` and
#: ``search_stride`` so that the whole fit stays within ``FitConfig.evaluation_budget`` (3) times the teacher recording
#: and chooses among the proposal, min-max and uniform on held-out re-fit samples (RESULTS.md, "Cheaper default
#: search": digits 0.0519 at 5 NFE, 0.0243 at 10, at 2.99x the recording instead of 10.6x).
DEFAULT_PATH = "refit"


@dataclass(frozen=True)
class SearchConfig:
    """Options of :func:`search_schedule`.

    Attributes:
        path: "uniform" (``i_j = round(j·T/n)``), "minimax" (the paper's: minimise the largest per-step error), or
            explicit teacher indices (e.g. found by :func:`olss_fast.core.refine.refit_path_search`); "refit" needs
            the model and is refused here (use ``fit_olss_scheduler(..., path="refit")``).
        granularity: "global" (one coefficient set, the paper's) or "channel" (one set per latent channel).
        bisection_iters: bisection steps on the error bound of the minimax search.
    """

    path: str | tuple[int, ...] = DEFAULT_STATS_PATH
    granularity: str = "global"
    bisection_iters: int = 60

    def __post_init__(self) -> None:
        if isinstance(self.path, str):
            check_stats_path(self.path)
        else:
            object.__setattr__(self, "path", tuple(checks.integer(i, "an explicit path's teacher index", 0)
                                                   for i in self.path))
        checks.choice(self.granularity, "granularity", GRANULARITIES)
        checks.integer(self.bisection_iters, "bisection_iters", 1, 10_000)


def check_stats_path(path: str) -> None:
    """``ValueError`` unless ``path`` is a path option :func:`search_schedule` can compute from statistics."""
    if path == "refit":
        raise ValueError(
            "path='refit' judges each path by the error after the student-in-the-loop re-fit, which runs the model: "
            "use fit_olss_scheduler(pipe, ..., path='refit') (CLI: olss-fast search --path refit) or "
            "olss_fast.core.refine.refit_path_search, then search_schedule(stats, n, path=<its indices>)"
        )
    if path not in STATS_PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")


class _Fitter:
    """Per-step least-squares fits on one GramStats, with a cache (the path search asks for the same fits often)."""

    def __init__(self, stats: GramStats, granularity: str) -> None:
        stats._require_data()
        self.stats = stats
        self.T = stats.num_teacher_steps
        self.gram = stats.gram if granularity == "channel" else stats.gram.sum(0, keepdim=True)
        self.granularity = granularity
        groups = self.gram.shape[0]
        self.equations = stats.num_samples * stats.elements_per_sample / groups  # equations per fit
        self.denominator = stats.num_samples * stats.elements_per_sample
        self._cache: dict[tuple[tuple[int, ...], int], tuple[torch.Tensor, float]] = {}

    def fit(self, path: Sequence[int], target: int) -> tuple[torch.Tensor, float]:
        """Fit teacher latent ``x[target]`` on ``{x[0], e[i] for i in path}`` → (coef ``[G, len(path)+1]``, MSE)."""
        key = (tuple(path), target)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        basis = [self.stats.x_index(0)] + [self.stats.e_index(i) for i in path]
        coef, sse = gram_lstsq(self.gram, basis, self.stats.x_index(target))
        result = (coef, float(sse.sum()) / self.denominator)
        self._cache[key] = result
        return result

    def path_fit(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[float]]:
        """Coefficients ``[G, n, n+1]`` and per-step MSEs of the whole path."""
        n = len(indices)
        coeffs = torch.zeros(self.gram.shape[0], n, n + 1, dtype=torch.float64)
        errors = []
        targets = list(indices[1:]) + [self.T]
        for j in range(n):
            coef, err = self.fit(indices[: j + 1], targets[j])
            coeffs[:, j, : j + 2] = coef.cpu()
            errors.append(err)
        return coeffs, errors


def uniform_path(num_teacher_steps: int, num_steps: int) -> list[int]:
    """``i_j = round(j·T/n)`` (half up), j = 0..n-1."""
    _check_steps(num_teacher_steps, num_steps)
    return [int(math.floor(j * num_teacher_steps / num_steps + 0.5)) for j in range(num_steps)]


def _check_steps(T: int, n: int) -> int:
    n = checks.integer(n, "num_steps", 1)
    if n > T:
        raise ValueError(f"cannot search {n} steps on a {T}-step teacher: num_steps must be <= teacher steps")
    return int(n)


def _greedy(fitter: _Fitter, n: int, bound: float) -> list[int] | None:
    """Paper's inner loop: from the current path, jump to the farthest teacher index whose fit error ≤ bound.

    Returns the path (possibly shorter than n) if the final latent is reached within n steps, else None.
    The error is assumed monotone in the jump length, so the farthest admissible index is found by bisection.
    """
    T = fitter.T
    path = [0]
    while True:
        if fitter.fit(path, T)[1] <= bound:
            return path
        if len(path) == n:
            return None
        lo, hi = path[-1] + 1, T - 1  # candidate next indices
        if lo > hi or fitter.fit(path, lo)[1] > bound:
            return None
        while lo < hi:  # largest m in [lo, hi] with err ≤ bound
            mid = (lo + hi + 1) // 2
            if fitter.fit(path, mid)[1] <= bound:
                lo = mid
            else:
                hi = mid - 1
        path.append(lo)


def _pad_path(path: list[int], n: int, T: int) -> list[int]:
    """Insert indices into the widest gaps until the path has n steps (used when fewer steps already suffice)."""
    path = list(path)
    while len(path) < n:
        bounds = path + [T]
        gaps = [(bounds[k + 1] - bounds[k], k) for k in range(len(path))]
        width, k = max(gaps)
        if width < 2:
            raise ValueError(f"cannot place {n} steps on a {T}-step teacher")
        path.insert(k + 1, bounds[k] + width // 2)
    return path


def minimax_path(fitter: _Fitter, n: int, iters: int = 60) -> list[int]:
    """The paper's path search: bisection on the bound of the largest per-step error (Algorithm 1).

    The greedy walk's feasibility is not monotone in the bound (a longer early jump can make a later step
    infeasible), so the bisection keeps the feasible path with the smallest *actual* largest error it met, and then
    keeps lowering the bound below that error (by 0.1% at a time) while the greedy walk still succeeds.
    """
    T = fitter.T
    _check_steps(T, n)

    def attempt(bound: float) -> tuple[list[int], float] | None:
        found = _greedy(fitter, n, bound)
        if found is None:
            return None
        path = _pad_path(found, n, T)
        return path, max(fitter.path_fit(path)[1])

    hi = fitter.fit([0], T)[1]  # one jump to the end is always admissible at this bound
    lo = 0.0
    best = attempt(hi)
    assert best is not None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        found = attempt(mid)
        if found is None:
            lo = mid
        else:
            hi = mid
            if found[1] < best[1]:
                best = found
        if hi - lo <= 1e-12 * max(hi, 1e-300):
            break
    for _ in range(500):  # descend below the best error found while the greedy walk stays feasible
        found = attempt(best[1] * (1 - 1e-3))
        if found is None or found[1] >= best[1]:
            break
        best = found
    return best[0]


#: what :func:`search_schedule` (and ``fit_olss_scheduler(..., refine=False)``) says once per process: the paper's fit
#: is not checked against anything on held-out noise
PAPER_FIT_WARNING = (
    "%s returns the paper's fit (OLSS Eq. 9-10: coefficients fitted on the teacher's own model outputs) without the "
    "student-in-the-loop re-fit and without any held-out check: on noise it was not fitted on it can be far worse "
    "than plain DDIM of the same NFE (benchmarks/RESULTS.md). Re-fit it (refine_schedule), or use "
    "fit_olss_scheduler with refine=True (the default: re-fitted, and checked against DDIM/Euler on held-out samples)"
)


def warn_paper_fit(where: str) -> None:
    """The one-time warning of :data:`PAPER_FIT_WARNING` for the entry point ``where``."""
    checks.warn_once(("paper-fit", where), PAPER_FIT_WARNING, where, logger=logger)


def search_schedule(stats: GramStats, num_steps: int, *, config: SearchConfig | None = None,
                    **options: Any) -> OLSSSchedule:
    """Fit an n-step OLSS schedule on teacher statistics: the paper's search and fit (no re-fit).

    Logs a one-time warning (:data:`PAPER_FIT_WARNING`): the result is the paper's fit, which nothing checks on
    held-out noise; re-fit it with :func:`olss_fast.core.refine.refine_schedule` before use.
    :func:`paper_schedule` is the same without the warning, for callers that re-fit what it returns.

    Args:
        stats: teacher statistics (:class:`GramStats`).
        num_steps: n, the number of student steps (model evaluations).
        config: a :class:`SearchConfig`, or its fields as keywords: ``path`` "uniform" (default), "minimax" (the
            paper's search; falls back to uniform when uniform is better on the search's own criterion, the largest
            per-step error) or explicit teacher indices; ``granularity`` "global" (default, the paper's single
            coefficient set) or "channel" (per latent channel); ``bisection_iters``.

    Raises:
        ValueError: empty statistics, n > T, too few samples for the number of unknowns, bad options.
    """
    schedule = paper_schedule(stats, num_steps, config=config, **options)
    warn_paper_fit("search_schedule")
    return schedule


def paper_schedule(stats: GramStats, num_steps: int, *, config: SearchConfig | None = None,
                   **options: Any) -> OLSSSchedule:
    """:func:`search_schedule` without its warning: the paper's path search and fit (Algorithm 1, Eq. 9-10), for
    callers that re-fit the result (``fit_olss_scheduler``) or only read its path."""
    config = checks.options(SearchConfig, config, options, "search")
    path = config.path
    if not isinstance(stats, GramStats):
        raise ValueError(f"stats must be GramStats, got {type(stats).__name__}")
    num_steps = _check_steps(stats.num_teacher_steps, num_steps)
    stats._require_data()
    T = stats.num_teacher_steps
    fitter = _Fitter(stats, config.granularity)
    unknowns = num_steps + 1
    if fitter.equations < unknowns:
        raise ValueError(
            f"{stats.num_samples} sample(s) × {int(fitter.equations)} elements per coefficient group give fewer "
            f"equations than the {unknowns} coefficients of the last of {num_steps} steps: record more samples "
            f"or use granularity='global'"
        )
    if not isinstance(path, str):
        indices = list(path)
        if len(indices) != num_steps:
            raise ValueError(f"explicit path has {len(indices)} indices but num_steps = {num_steps}")
        if indices[0] != 0 or any(a >= b for a, b in zip(indices, indices[1:])) or indices[-1] >= T:
            raise ValueError(f"explicit path must start at 0, increase strictly and stay below T={T}: {indices}")
        chosen = "custom"
    elif config.path == "uniform":
        indices, chosen = uniform_path(T, num_steps), "uniform"
    else:
        indices, chosen = minimax_path(fitter, num_steps, config.bisection_iters), "minimax"
        uni = uniform_path(T, num_steps)
        if max(fitter.path_fit(uni)[1]) < max(fitter.path_fit(indices)[1]):
            logger.info("minimax search found no path better than uniform on its own criterion; using uniform")
            indices, chosen = uni, "uniform"
    basis = [stats.x_index(0)] + [stats.e_index(i) for i in indices]
    rank = numerical_rank(fitter.gram, basis)
    if rank < len(basis):
        logger.info(
            "the %d basis vectors of this path are numerically collinear (rank %d) in the recorded data; "
            "using minimum-norm coefficients where needed", len(basis), rank,
        )
    coeffs, errors = fitter.path_fit(indices)
    if config.granularity == "global":
        coeffs = coeffs[0]
    return OLSSSchedule(
        timesteps=[stats.timesteps[i] for i in indices],
        indices=indices,
        coeffs=coeffs,
        errors=errors,
        teacher_steps=T,
        prediction_type=stats.prediction_type,
        path=chosen,
        refined=False,
        teacher=stats.teacher,
        fitted_for=dict(stats.context, num_samples=stats.num_samples) if stats.context else {},
        meta={"num_samples": stats.num_samples, "model": stats.model},
    )


def coefficient_errors(stats: GramStats, indices: Sequence[int], coeffs: torch.Tensor) -> list[float]:
    """Per-step MSE on the teacher data of *given* coefficients ``[n, n+1]`` (e.g. DDIM's) on a path.

    ``‖y − Σ c_k b_k‖² = G_yy − 2 c·G_Sy + cᵀ G_SS c`` summed over samples, divided by ``B·D``.
    """
    g = stats.global_gram()
    T = stats.num_teacher_steps
    targets = list(indices[1:]) + [T]
    out = []
    for j in range(len(indices)):
        basis = [stats.x_index(0)] + [stats.e_index(i) for i in indices[: j + 1]]
        c = coeffs[j, : j + 2].to(torch.float64)
        idx = torch.tensor(basis)
        y = stats.x_index(targets[j])
        sse = g[y, y] - 2 * (c * g[idx, y]).sum() + c @ g[idx][:, idx] @ c
        out.append(float(sse) / (stats.num_samples * stats.elements_per_sample))
    return out
