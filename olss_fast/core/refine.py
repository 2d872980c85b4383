"""Student-in-the-loop re-fit of OLSS coefficients (docs/design.md, "Student-in-the-loop re-fit"; beyond the paper).

The paper fits step j on the *teacher's* model outputs, but at inference the student feeds the model its own latents.
Here the student is run on the training noise one step at a time: step j is fitted on ``{x0, e_0 … e_j}`` where the
e's are the model's outputs at the *student's* latents, with the teacher's latent at the next path index as target,
and the student is then advanced with the fitted step. Same path, new coefficients.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from olss_fast.core.grid import layer_width, node_rule, programme_states
from olss_fast.core.lstsq import gram_lstsq, solve_spd
from olss_fast.core.oss import trace_back
from olss_fast.core.schedule import GRANULARITIES, OLSSSchedule
from olss_fast.core.search import uniform_path
from olss_fast.core.step import student_latent

logger = logging.getLogger(__name__)

#: evaluate(j, coeffs_so_far [.., n, n+1] float32, history [e_0..e_{j-1}]) -> e_j for all samples
StepEvaluator = Callable[[int, torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]
#: batched(latents, timesteps) -> model outputs: ``denoise(z, t)`` of several states (``[B, ...]`` latents at one
#: timestep each) at once, e.g. in one denoiser call with per-row timesteps (:func:`refit_programme`)
LayerDenoiser = Callable[[Sequence[torch.Tensor], Sequence[Any]], Sequence[torch.Tensor]]


def _channel_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ over samples and elements of a·b, per channel (dim 1) → ``[C]`` float64."""
    prod = a.to(torch.float64) * b.to(torch.float64)
    if prod.dim() < 3:
        return prod.sum().reshape(1)
    return prod.transpose(0, 1).reshape(prod.shape[1], -1).sum(-1)


class RefitState:
    """The re-fit's running state on one path: coefficient rows, the student's model outputs and their Gram.

    Step j is: ``latent(j)`` (the student's latent, from rows < j), the model output there ``add_output(e)``, then
    ``fit(j, target)``. :func:`sequential_refit` runs the steps in order; :func:`refit_path_search` forks a state
    after step p−1 (``fork(p)``) to try another path that shares the first p timesteps.
    """

    def __init__(self, x0: torch.Tensor, n: int, granularity: str, ridge: float) -> None:
        self.x0f = x0.to(torch.float32)
        self.n = n
        self.granularity = granularity
        self.ridge = ridge
        self.channels = x0.shape[1] if x0.dim() >= 3 else 1
        self.groups = self.channels if granularity == "channel" else 1
        self.coeffs = torch.zeros(self.groups, n, n + 1, dtype=torch.float64)
        self.history: list[torch.Tensor] = []
        self.basis_gram = torch.zeros(self.channels, n + 1, n + 1, dtype=torch.float64)  # [x0, e_0..e_{n-1}]
        self.basis_gram[:, 0, 0] = _channel_dots(self.x0f, self.x0f)
        self.errors: list[float] = []
        self.denom = x0.numel()

    def inference_coeffs(self) -> torch.Tensor:
        """The coefficients so far as the scheduler uses them (float32, ``[n, n+1]`` or ``[C, n, n+1]``)."""
        return (self.coeffs if self.granularity == "channel" else self.coeffs[0]).to(torch.float32)

    def latent(self, j: int) -> torch.Tensor:
        """The student's latent at step j, computed exactly as ``OLSSScheduler.step`` computes it at inference."""
        return student_latent(self.inference_coeffs(), j, self.x0f, self.history)

    def add_output(self, e: torch.Tensor) -> None:
        """Append the model output of the next step (``e_j``, j = len(history)) and its inner products."""
        j = len(self.history)
        self.history.append(e)
        for k, v in enumerate([self.x0f] + self.history):
            d = _channel_dots(e, v)
            self.basis_gram[:, j + 1, k] = d
            self.basis_gram[:, k, j + 1] = d

    def fit(self, j: int, target: torch.Tensor) -> float:
        """Fit row j on ``{x0, e_0 … e_j}`` to ``target``; returns (and records) its MSE."""
        y = target.to(torch.float32)
        basis = [self.x0f] + self.history[: j + 1]
        m = j + 2
        g = torch.zeros(self.channels, m + 1, m + 1, dtype=torch.float64)
        g[:, :m, :m] = self.basis_gram[:, :m, :m]
        for k, v in enumerate(basis):
            d = _channel_dots(y, v)
            g[:, m, k] = d
            g[:, k, m] = d
        g[:, m, m] = _channel_dots(y, y)
        if self.granularity == "global":
            g = g.sum(0, keepdim=True)
        coef, sse = gram_lstsq(g, list(range(m)), m, self.ridge)
        self.coeffs[:, j, :] = 0
        self.coeffs[:, j, :m] = coef
        err = float(sse.sum()) / self.denom
        del self.errors[j:]
        self.errors.append(err)
        return err

    def fork(self, p: int) -> "RefitState":
        """A copy that keeps steps 0 … p−1's model outputs and rows 0 … p−2 (row p−1 is to be fitted again)."""
        other = object.__new__(RefitState)
        other.__dict__.update(self.__dict__)
        other.history = list(self.history[:p])
        other.coeffs = self.coeffs.clone()
        other.coeffs[:, max(p - 1, 0):] = 0
        other.basis_gram = self.basis_gram.clone()
        other.errors = list(self.errors[: max(p - 1, 0)])
        return other


def check_output(e: torch.Tensor, like: torch.Tensor, j: int) -> torch.Tensor:
    """A model output of student step j as the re-fit uses it (float32, detached); ValueError for a shape other than
    ``like``'s or NaN/Inf."""
    e = e.detach().to(torch.float32)
    if e.shape != like.shape:
        raise ValueError(f"the model output at step {j} has shape {list(e.shape)}, expected {list(like.shape)}")
    if not torch.isfinite(e).all():
        raise ValueError(f"the model output at student step {j} contains NaN/Inf")
    return e


def check_equations(x0: torch.Tensor, n: int, granularity: str) -> None:
    """ValueError unless ``granularity`` is known and the samples ``x0`` give at least n + 1 equations per
    coefficient set (the last of n steps has n + 1 coefficients)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
    channels = x0.shape[1] if x0.dim() >= 3 else 1
    groups = channels if granularity == "channel" else 1
    equations = x0.numel() / groups
    if equations < n + 1:
        raise ValueError(
            f"{x0.shape[0]} sample(s) give {int(equations)} equations per coefficient set, fewer than the {n + 1} "
            "coefficients of the last step: use more samples"
        )


def sequential_refit(
    schedule: OLSSSchedule,
    x0: torch.Tensor,
    targets: torch.Tensor,
    evaluate: StepEvaluator,
    granularity: str | None = None,
    progress: bool = True,
    ridge: float = 1e-8,
) -> OLSSSchedule:
    """Core of the re-fit, independent of how the model is evaluated.

    Args:
        schedule: the schedule whose path (timesteps, indices) is kept.
        x0: ``[B, C, ...]`` training noise.
        targets: ``[n, B, C, ...]`` teacher latents at ``indices[1:] + [T]``.
        evaluate: returns the model output e_j at the student's latent of step j for all B samples.
        granularity: "global" or "channel" (default: the schedule's).
        ridge: relative Tikhonov regularisation of each step's fit (see ``lstsq.solve_spd``). The student's late
            model outputs are nearly collinear, and the exact fit then uses huge alternating coefficients that
            amplify any difference on unseen noise; 1e-8 kept 10-step held-out RMSE on Gaussian mixtures at
            0.0003–0.018 where the exact fit gave up to 0.35 with 32–64 training samples.
    """
    n = schedule.num_steps
    gran = granularity or schedule.granularity
    if targets.shape[0] != n or targets.shape[1:] != x0.shape:
        raise ValueError(f"targets must be [{n}, *noise.shape] = [{n}, {list(x0.shape)}], got {list(targets.shape)}")
    check_equations(x0, n, gran)
    state = RefitState(x0, n, gran, ridge)
    for j in tqdm(range(n), desc=f"refining {n}-step schedule", disable=not progress, leave=False):
        e = check_output(evaluate(j, state.inference_coeffs(), state.history), state.x0f, j)
        state.add_output(e)
        state.fit(j, targets[j])
    out = state.coeffs if gran == "channel" else state.coeffs[0]
    meta = dict(schedule.meta)
    meta.update({"refine_samples": int(x0.shape[0]), "paper_fit_errors": list(schedule.errors)})
    return OLSSSchedule(
        timesteps=schedule.timesteps, indices=schedule.indices, coeffs=out, errors=list(state.errors),
        teacher_steps=schedule.teacher_steps, prediction_type=schedule.prediction_type, path=schedule.path,
        refined=True, teacher=schedule.teacher, fitted_for=schedule.fitted_for, meta=meta,
    )


def path_targets(schedule: OLSSSchedule, teacher_latents: torch.Tensor) -> torch.Tensor:
    """Teacher latents at ``indices[1:] + [T]`` from a full teacher trajectory ``[T+1, B, ...]``."""
    T = teacher_latents.shape[0] - 1
    if T != schedule.teacher_steps:
        raise ValueError(
            f"teacher_latents hold {T} teacher steps (+1 final latent) but the schedule was searched on a "
            f"{schedule.teacher_steps}-step teacher"
        )
    idx = list(schedule.indices[1:]) + [T]
    return teacher_latents[idx]


@torch.no_grad()
def refine_schedule(
    schedule: OLSSSchedule,
    denoise: Callable[[torch.Tensor, Any], torch.Tensor],
    noise: torch.Tensor,
    teacher_latents: torch.Tensor,
    *,
    granularity: str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    ridge: float = 1e-8,
) -> OLSSSchedule:
    """Re-fit a schedule's coefficients on the student's own model outputs (same path).

    Args:
        schedule: a searched schedule.
        denoise: ``denoise(x, t) -> e`` the guided model output for a batch of latents at timestep t.
        noise: ``[B, ...]`` the initial noise of the teacher run (``x_path[0]``).
        teacher_latents: ``[T+1, B, ...]`` that run's latents (``x_path``).
        granularity: "global" or "channel" (default: the schedule's).
        batch_size: evaluate the model on at most this many samples at once (default: all).
        ridge: see :func:`sequential_refit`.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer (or None for all samples at once), got {batch_size!r}")
    if noise.shape != teacher_latents.shape[1:]:
        raise ValueError(
            f"noise {list(noise.shape)} must match one teacher latent {list(teacher_latents.shape[1:])}"
        )
    if not torch.allclose(noise.to(teacher_latents.dtype), teacher_latents[0], rtol=1e-4, atol=1e-5):
        raise ValueError("noise must be the teacher run's initial latent (teacher_latents[0])")
    targets = path_targets(schedule, teacher_latents).to(noise.device)
    x0f = noise.to(torch.float32)
    bs = batch_size or noise.shape[0]

    def evaluate(j: int, coeffs: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
        z = student_latent(coeffs.to(x0f.device), j, x0f, history)
        t = schedule.timesteps[j]
        outs = [denoise(z[s : s + bs].to(noise.dtype), t) for s in range(0, z.shape[0], bs)]
        return torch.cat(outs)

    return sequential_refit(schedule, noise, targets, evaluate, granularity, progress, ridge)


@dataclass(frozen=True)
class RefitSearchResult:
    """What :func:`refit_path_search` found for one step count.

    Attributes:
        indices: the chosen path (teacher indices, ``indices[0] == 0``).
        error: its final-latent MSE after the re-fit on the search samples (the search's objective).
        start_error: the same for the uniform path.
        proposal: the path the dynamic programme proposed (None without it) and ``proposal_error`` its objective.
        evaluations: model evaluations of the descent and of judging the starts (each over all search samples; the
            programme's, shared by all step counts, are in ``meta["programme_evaluations"]``).
        paths_tried: distinct paths whose objective was computed.
    """

    indices: list[int]
    error: float
    start_error: float
    proposal: list[int] | None
    proposal_error: float | None
    evaluations: int
    paths_tried: int
    meta: dict[str, Any] = field(default_factory=dict)


def _teacher_dots(teacher_latents: torch.Tensor, channels: int) -> torch.Tensor:
    """Teacher latents as float64 ``[C, T+1, B·rest]`` (channel-major), for batched inner products."""
    y = teacher_latents.to(torch.float32).to(torch.float64)
    if y.dim() < 4:  # [T+1, B, D]: one channel
        return y.reshape(1, y.shape[0], -1)
    return y.transpose(1, 2).reshape(y.shape[0], channels, -1).transpose(0, 1)


def _fit_errors(state: RefitState, j: int, ys: torch.Tensor) -> torch.Tensor:
    """MSE of fitting row j of ``state`` (basis x0, e_0 … e_j) to each target in ``ys`` ``[C, J, B·rest]`` at once
    (the same least squares as :meth:`RefitState.fit`, batched over targets)."""
    m = j + 2
    basis = torch.stack([v.to(torch.float64) for v in [state.x0f] + state.history[: j + 1]])  # [m, B, C, ...]
    if basis.dim() < 4:
        bc = basis.reshape(1, m, -1)
    else:
        bc = basis.transpose(1, 2).reshape(m, state.channels, -1).transpose(0, 1)  # [C, m, B·rest]
    cross = ys @ bc.transpose(1, 2)  # [C, J, m]
    yy = ys.pow(2).sum(-1)  # [C, J]
    a = state.basis_gram[:, :m, :m]
    if state.granularity == "global":
        cross, yy, a = cross.sum(0, keepdim=True), yy.sum(0, keepdim=True), a.sum(0, keepdim=True)
    a = a.unsqueeze(1).expand(-1, cross.shape[1], -1, -1)  # [G, J, m, m]
    coef = solve_spd(a, cross, state.ridge)
    quad = (coef.unsqueeze(-2) @ a @ coef.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    sse = (yy - 2 * (coef * cross).sum(-1) + quad).clamp_min(0.0)
    return sse.sum(0) / state.denom


def refit_programme(
    timesteps: Sequence[Any],
    noise: torch.Tensor,
    teacher_latents: torch.Tensor,
    denoise: Callable[[torch.Tensor, Any], torch.Tensor],
    num_steps: Sequence[int],
    *,
    granularity: str = "global",
    ridge: float = 1e-8,
    stride: int = 1,
    progress: bool = True,
    batched: LayerDenoiser | None = None,
    final_states: int = 1,
) -> tuple[dict[int, tuple[list[int], float]], int]:
    """OSS's dynamic programme (:mod:`olss_fast.core.oss`) with the student-in-the-loop re-fit as the solver step.

    State ``(k, i)``: the re-fitted student after k steps standing at teacher index i (its rows 0 … k−1 fitted on
    the targets of its path), the best such k-step student by its error at i. Transition ``i → j``: evaluate the model
    at the state's latent (once per state, shared by every j), fit row k to the teacher latent at j; that fit's
    error is the cost. The error into the final latent is exactly the re-fit's objective of the whole path; the
    recursion (keep the best state per node) is OSS's approximation. ``final_states`` > 1 keeps that many of the best
    states per node in each layer whose next step can be the last one (:func:`~olss_fast.core.grid.layer_width`; one
    model evaluation each): the state with the lowest error at a node is not always the one with the lowest error at
    the end. Returns ``{n: (path, final MSE)}`` and the
    number of model evaluations (:func:`~olss_fast.core.grid.programme_states`, ``O(max n · T / stride)``, shared
    by every n). ``stride`` > 1 restricts the students' timesteps to :func:`~olss_fast.core.grid.programme_grid` (a
    cheaper, coarser programme). ``batched`` evaluates each layer's states at once (it must return what ``denoise``
    returns for each state; default: one ``denoise`` call per state).
    """
    T = len(timesteps)
    steps = sorted(set(int(n) for n in num_steps))
    n_max = steps[-1]
    useful = node_rule(T, steps, stride)
    total = programme_states(T, steps, stride, final_states)  # (its ValueError for a bad final_states first)
    x0 = noise.to(torch.float32)
    root = RefitState(x0, n_max, granularity, ridge)
    ys = _teacher_dots(teacher_latents, root.channels)  # [C, T+1, B·rest]
    # a state is (node, rank): the rank-th best state into that node; parents[k][(j, r)] is the state before it
    layer: dict[tuple[int, int], RefitState] = {(0, 0): root}
    parents: list[dict[tuple[int, int], tuple[int, int]]] = [{}]
    finals: dict[int, tuple[float, tuple[int, int]]] = {}
    evaluations = 0
    bar = tqdm(total=total, desc="refit programme", unit="eval", disable=not progress, leave=False)
    for k in range(n_max):
        into: dict[int, list[tuple[float, tuple[int, int]]]] = {}  # node j -> [(error at j, state before)]
        keys = sorted(layer)
        zs, ts = [layer[s].latent(k) for s in keys], [timesteps[s[0]] for s in keys]
        outs = list(batched(zs, ts) if batched is not None else (denoise(z, t) for z, t in zip(zs, ts)))
        if len(outs) != len(keys):
            raise ValueError(f"batched returned {len(outs)} model outputs for the {len(keys)} states of layer {k}")
        del zs
        for key, e in zip(keys, outs):
            state = layer[key]
            state.add_output(check_output(e, x0, k))
            evaluations += 1
            bar.update(1)
            targets = [j for j in range(key[0] + 1, T + 1)
                       if (j == T and k + 1 in steps) or (j < T and useful(k + 1, j))]
            if not targets:
                continue
            errs = _fit_errors(state, k, ys[:, targets]).tolist()
            for j, err in zip(targets, errs):
                if j == T:
                    if k + 1 not in finals or err < finals[k + 1][0]:
                        finals[k + 1] = (err, key)
                else:
                    into.setdefault(j, []).append((err, key))
        width = layer_width(k + 1, steps, final_states)
        nxt: dict[tuple[int, int], RefitState] = {}
        links: dict[tuple[int, int], tuple[int, int]] = {}
        for j, found in into.items():
            for r, (_, key) in enumerate(sorted(found)[:width]):
                child = layer[key].fork(k + 1)  # its outputs e_0 … e_k, rows 0 … k-1
                child.fit(k, teacher_latents[j])
                nxt[(j, r)], links[(j, r)] = child, key
        parents.append(links)
        layer = nxt
    bar.close()
    out = {}
    for n in steps:
        err, key = finals[n]
        out[n] = ([j for j, _ in trace_back(parents, key, n)], err)
    return out, evaluations


def refit_path_search(
    timesteps: Sequence[Any],
    noise: torch.Tensor,
    teacher_latents: torch.Tensor,
    denoise: Callable[[torch.Tensor, Any], torch.Tensor],
    num_steps: int | Sequence[int],
    *,
    programme: bool = True,
    stride: int = 1,
    sweeps: int = 0,
    start: Sequence[int] | Mapping[int, Sequence[int]] | None = None,
    granularity: str = "global",
    ridge: float = 1e-8,
    progress: bool = True,
    agree: Callable[[Any], Any] | None = None,
    final_states: int = 1,
) -> dict[int, RefitSearchResult]:
    """Path search judged after the student-in-the-loop re-fit (docs/design.md, "Path search"; beyond the paper).

    The objective of a path is the final-latent MSE against the teacher of the student *after* the re-fit
    (:func:`sequential_refit`) on ``noise``, i.e. what the re-fit reports as its last error. For each step count:

    1. the uniform path (and ``start``, if given: ``fit_olss_scheduler`` passes the programme's proposal when
       ``search_sweeps`` asks for the descent) and, with ``programme``, the path proposed by :func:`refit_programme`
       (OSS's dynamic programme with the re-fit inside, run once for all step counts) are judged exactly on
       ``noise``; the best becomes the current path (ties keep uniform);
    2. ``sweeps`` passes of coordinate descent: for each position p = 1 … n−1, try moving ``i_p`` by ±s teacher
       steps (s from a quarter of the free interval, halved down to 1, repeated while a move helps); a try re-uses
       the model outputs of steps 0 … p−1 and costs n − p model evaluations; a move is kept only if it lowers the
       objective.

    Only improvements are accepted, so the result is never worse than the uniform path on the objective.

    Args:
        timesteps: the teacher's T timesteps (``stats.timesteps``).
        noise: ``[B, ...]`` the search samples' initial noise (``teacher_latents[0]``).
        teacher_latents: ``[T+1, B, ...]`` the teacher's latents on that noise.
        denoise: ``denoise(x, t) -> e`` the (guided) model output for all B latents at timestep t.
        num_steps: n, or several (one result each).
        programme: propose a path with :func:`refit_programme`.
        stride: the programme's grid (:func:`~olss_fast.core.grid.programme_grid`; 1: all; larger is cheaper and
            coarser).
        sweeps: passes of coordinate descent (0: none).
        start: another path to judge as a start (for one step count), or ``{n: path}`` for several.
        granularity, ridge: as in :func:`sequential_refit`.
        agree: maps each objective value to the one every process uses (rank 0's under torch.distributed), so
            that all processes take the same decisions; default: as computed.
        final_states: the programme's states per node before a last step (:func:`refit_programme`). ``stride`` and
            ``final_states`` other than 1 need ``programme``.

    Raises:
        ValueError: shapes that do not fit, step counts outside 1 … T, a bad start path, too few samples, NaN model
            outputs, programme options without the programme.
    """
    T = len(timesteps)
    single = isinstance(num_steps, int) and not isinstance(num_steps, bool)
    counts = [num_steps] if single else list(num_steps)
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T for n in counts):
        raise ValueError(f"num_steps must be integers in [1, {T}] (the teacher's steps), got {num_steps!r}")
    counts = sorted(set(counts))
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"sweeps must be a non-negative integer, got {sweeps!r}")
    if not programme and (stride != 1 or final_states != 1):
        raise ValueError(f"stride={stride!r} and final_states={final_states!r} size the programme, which "
                         "programme=False does not run: leave them at 1 or run the programme")
    if teacher_latents.shape[0] != T + 1 or teacher_latents.shape[1:] != noise.shape:
        raise ValueError(
            f"teacher_latents must be [T+1, *noise.shape] = [{T + 1}, {list(noise.shape)}] for a {T}-step teacher, "
            f"got {list(teacher_latents.shape)}"
        )
    if not torch.allclose(noise.to(teacher_latents.dtype), teacher_latents[0], rtol=1e-4, atol=1e-5):
        raise ValueError("noise must be the teacher run's initial latent (teacher_latents[0])")
    check_equations(noise, counts[-1], granularity)
    if start is None:
        starts: dict[int, list[int]] = {}
    elif isinstance(start, Mapping):
        starts = {int(n): [int(i) for i in p] for n, p in start.items()}
        if not set(starts) <= set(counts):
            raise ValueError(f"start has paths for step counts {sorted(set(starts) - set(counts))} that are not "
                             f"searched ({counts})")
    elif len(counts) == 1:
        starts = {counts[0]: [int(i) for i in start]}
    else:
        raise ValueError(f"a single start path needs a single step count; give {{n: path}} for {counts}")
    for n, p in starts.items():
        if len(p) != n or p[0] != 0 or any(a >= b for a, b in zip(p, p[1:])) or p[-1] >= T:
            raise ValueError(f"start must be {n} teacher indices starting at 0, strictly increasing, below {T}, "
                             f"for {n} steps: {p}")
    agree = agree or (lambda v: v)
    x0 = noise.to(torch.float32)
    proposals: dict[int, tuple[list[int], float]] = {}
    prog_evals = 0
    if programme:
        proposals, prog_evals = refit_programme(timesteps, noise, teacher_latents, denoise, counts,
                                                granularity=granularity, ridge=ridge, stride=stride,
                                                progress=progress, final_states=final_states)
        proposals = agree(proposals)
    results = {}
    for n in counts:
        results[n] = _descend(timesteps, x0, teacher_latents, denoise, n, uniform_path(T, n), starts.get(n),
                              proposals[n][0] if n in proposals else None, sweeps, granularity, ridge, progress,
                              agree)
        results[n].meta["programme_evaluations"] = prog_evals
    return results[counts[0]] if single else results


def _descend(timesteps: Sequence[Any], x0: torch.Tensor, teacher_latents: torch.Tensor,
             denoise: Callable[[torch.Tensor, Any], torch.Tensor], n: int, uniform: list[int],
             start: list[int] | None, proposal: list[int] | None, sweeps: int, granularity: str, ridge: float,
             progress: bool, agree: Callable[[Any], Any]) -> RefitSearchResult:
    T = len(timesteps)
    evaluations = 0
    bar = tqdm(desc=f"refit path search ({n} steps)", unit="path", disable=not progress, leave=False)

    def target(p: Sequence[int], j: int) -> torch.Tensor:
        return teacher_latents[p[j + 1]] if j + 1 < n else teacher_latents[T]

    def run(p: Sequence[int], base: RefitState | None = None, at: int = 0) -> tuple[RefitState, float]:
        nonlocal evaluations
        if base is None:
            state, first = RefitState(x0, n, granularity, ridge), 0
        else:  # same timesteps as base before position `at`: re-use those outputs, re-fit row at-1 on its new target
            state, first = base.fork(at), at
            state.fit(at - 1, target(p, at - 1))
        for j in range(first, n):
            e = check_output(denoise(state.latent(j), timesteps[p[j]]), x0, j)
            evaluations += 1
            state.add_output(e)
            state.fit(j, target(p, j))
        bar.update(1)
        return state, float(agree(state.errors[-1]))

    current, best = run(uniform)
    path, start_error = list(uniform), best
    seen = {tuple(path): best}
    proposal_error = None
    for other in (start, proposal):
        if other is None:
            continue
        if tuple(other) in seen:
            err = seen[tuple(other)]
        else:
            state, err = run(other)
            seen[tuple(other)] = err
            if err < best:
                current, best, path = state, err, list(other)
        if other is proposal:
            proposal_error = err
    for _ in range(sweeps):
        changed = False
        for p in range(1, n):
            lo = path[p - 1] + 1
            hi = path[p + 1] - 1 if p + 1 < n else T - 1
            step = max(1, (hi - lo + 2) // 4)
            while step >= 1:
                tried = []
                for cand in (path[p] - step, path[p] + step):
                    trial = path[:p] + [cand] + path[p + 1 :]
                    if not lo <= cand <= hi or tuple(trial) in seen:
                        continue
                    state, err = run(trial, current, p)
                    seen[tuple(trial)] = err
                    tried.append((err, cand, state))
                win = min(tried, key=lambda r: r[0], default=None)
                if win is not None and win[0] < best:
                    best, path, current = win[0], path[:p] + [win[1]] + path[p + 1 :], win[2]
                    lo = path[p - 1] + 1
                    hi = path[p + 1] - 1 if p + 1 < n else T - 1
                    changed = True
                else:
                    step //= 2
        if not changed:
            break
    bar.close()
    logger.info("refit path search, %d steps: %s, final MSE %.4g (uniform %.4g, proposal %s: %s), %d paths, "
                "%d model evaluations", n, path, best, start_error, proposal, proposal_error, len(seen), evaluations)
    return RefitSearchResult(indices=list(path), error=best, start_error=start_error,
                             proposal=list(proposal) if proposal is not None else None, proposal_error=proposal_error,
                             evaluations=evaluations, paths_tried=len(seen))
