"""Optimal-stepsize baselines: OSS's dynamic programme over a teacher trajectory (docs/design.md, "Baselines").

Optimal Stepsize Distillation (OSS; Pei, Hu, Gu 2025, arXiv 2503.21774) keeps a solver as it is and learns only
*where* it steps: on a reference (teacher) trajectory with grid ``t_0 > t_1 > … > t_N`` (the teacher's timesteps
plus the end of sampling) and states ``x_ref[i]``, a dynamic programme picks the n grid nodes of the solver's steps.
This is an independent implementation of that idea (no code of the paper's):

- state ``(k, i)``: the student has taken k steps and stands at node i; it holds the student's latent ``z`` reached
  by the best k-step path to i (for DPM-Solver++(2M) also the data prediction and λ of the path's previous node,
  which its next step uses) and the error of ``z``;
- transition ``i → j`` (j > i): the solver's step from ``t_i`` to ``t_j`` applied to ``z`` — one model evaluation
  at ``(z, t_i)`` per state, shared by every j; cost ``Σ_samples ‖z_j − x_ref[j]‖²``;
- ``(k+1, j)`` keeps the predecessor with the smallest cost (OSS's recursion: the best path to j re-uses the best
  path to its predecessor); the answer for n steps is the best transition into the final node N from layer n−1.

The k-step states do not depend on n, so one run up to the largest n answers every step count:
``O(max n · N)`` model evaluations per sample batch. Solvers (data-prediction form, ``α = √ᾱ``, ``σ = √(1−ᾱ)``,
``λ = log α − log σ``, ``h = λ_t − λ_s``, ``D0`` the data prediction at s):

- ``"ddim"`` (DDIM = Euler on the probability-flow ODE = first-order DPM-Solver++):
  ``x_t = (σ_t/σ_s)·x_s − α_t(e^{−h} − 1)·D0``;
- ``"dpmsolver++"`` (DPM-Solver++(2M), midpoint form, as diffusers' ``DPMSolverMultistepScheduler`` with
  ``solver_order=2``): the first step and the last one (into σ = 0) are first order, the others add
  ``−½α_t(e^{−h} − 1)·D1`` with ``D1 = (D0 − D_prev)/r``, ``r = (λ_s − λ_prev)/h``.

Pure functions of tensors and a ``denoise(x, t) -> model output`` callable; the chosen timesteps run as diffusers'
own schedulers with custom timesteps (:func:`olss_fast.fit.baselines.oss_scheduler`).
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence, TypeVar

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)
#: a programme node (:func:`trace_back`)
K = TypeVar("K", bound=Hashable)

#: solvers the dynamic programme knows (their step is implemented here)
SOLVERS = ("ddim", "dpmsolver++")
#: model output parametrisations the solvers convert to a data prediction
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

Denoise = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class NodeLevels:
    """Noise levels of one grid node: ``alpha = √ᾱ``, ``sigma = √(1−ᾱ)``, ``lam = log α − log σ`` (+inf at σ = 0)."""

    alpha: float
    sigma: float
    lam: float


def node_levels(alpha_bar: float) -> NodeLevels:
    """:class:`NodeLevels` of a cumulative ᾱ in (0, 1] (float64 arithmetic)."""
    ab = float(alpha_bar)
    if not 0.0 < ab <= 1.0 or not math.isfinite(ab):
        raise ValueError(f"ᾱ must be in (0, 1], got {alpha_bar!r}")
    alpha, sigma = math.sqrt(ab), math.sqrt(1.0 - ab)
    lam = math.inf if sigma == 0.0 else math.log(alpha) - math.log(sigma)
    return NodeLevels(alpha, sigma, lam)


def data_prediction(x: torch.Tensor, output: torch.Tensor, node: NodeLevels,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """The data prediction ``D = x̂_0`` from the model output at a node (diffusers' ``convert_model_output``)."""
    if prediction_type == "epsilon":
        return (x - node.sigma * output) / node.alpha
    if prediction_type == "v_prediction":
        return node.alpha * x - node.sigma * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; OSS supports {PREDICTION_TYPES}")


def first_order_step(x: torch.Tensor, d0: torch.Tensor, s: NodeLevels, t: NodeLevels) -> torch.Tensor:
    """DDIM / DPM-Solver++ first order from node s to node t: ``(σ_t/σ_s)·x − α_t(e^{−h} − 1)·D0``."""
    if t.sigma == 0.0:  # into clean data: the data prediction itself
        return d0
    h = t.lam - s.lam
    return (t.sigma / s.sigma) * x - (t.alpha * math.expm1(-h)) * d0


def second_order_step(x: torch.Tensor, d0: torch.Tensor, d_prev: torch.Tensor, prev_lam: float, s: NodeLevels,
                      t: NodeLevels) -> torch.Tensor:
    """DPM-Solver++(2M), midpoint form, from s to t with the previous node's data prediction ``d_prev``."""
    if t.sigma == 0.0:
        raise ValueError("the step into σ = 0 is first order (diffusers' lower_order_final)")
    h, h0 = t.lam - s.lam, s.lam - prev_lam
    d1 = (d0 - d_prev) * (h / h0)
    c = t.alpha * math.expm1(-h)
    return (t.sigma / s.sigma) * x - c * d0 - 0.5 * c * d1


def solver_step(solver: str, x: torch.Tensor, d0: torch.Tensor, s: NodeLevels, t: NodeLevels,
                prev: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """One step of ``solver`` from s to t; ``prev`` = (data prediction, λ) of the path's previous node, if any."""
    if solver == "dpmsolver++" and prev is not None and t.sigma > 0.0:
        return second_order_step(x, d0, prev[0], prev[1], s, t)
    return first_order_step(x, d0, s, t)


@dataclass
class _State:
    z: torch.Tensor
    err: float
    parent: int
    prev: tuple[torch.Tensor, float] | None  # (data prediction, λ) at the parent node, for the 2M step


@dataclass
class OSSResult:
    """Paths chosen by :func:`oss_search`, per step count n.

    Attributes:
        solver: "ddim" or "dpmsolver++".
        indices: ``{n: [i_0 = 0, …, i_{n−1}]}`` grid nodes where the solver evaluates the model.
        timesteps: ``{n: [t_{i_0}, …]}`` the same as model timesteps (descending).
        errors: ``{n: MSE}`` of the final latent against the reference on the search samples.
        grid_timesteps: the reference's T timesteps.
        evaluations: model evaluations made (each over all search samples).
    """

    solver: str
    indices: dict[int, list[int]]
    timesteps: dict[int, list[Any]]
    errors: dict[int, float]
    grid_timesteps: list[Any]
    evaluations: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def _check_num_steps(num_steps: Sequence[int] | int, T: int) -> list[int]:
    if isinstance(num_steps, numbers.Integral) and not isinstance(num_steps, bool):
        num_steps = [int(num_steps)]
    if isinstance(num_steps, (str, bytes)) or not isinstance(num_steps, Sequence) or not num_steps:
        raise ValueError(f"num_steps must be a positive integer or a non-empty list of them, got {num_steps!r}")
    out = []
    for n in num_steps:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= T:
            raise ValueError(f"every step count must be an integer in [1, {T}] (the reference's steps), got {n!r}")
        out.append(int(n))
    return sorted(set(out))


@torch.no_grad()
def oss_search(
    denoise: Denoise,
    reference: torch.Tensor,
    timesteps: Sequence[Any],
    alpha_bars: Sequence[float] | torch.Tensor,
    num_steps: Sequence[int] | int,
    solver: str = "ddim",
    *,
    prediction_type: str = "epsilon",
    progress: bool = True,
) -> OSSResult:
    """OSS's dynamic programme (module docstring): the best n-step path of ``solver`` along a reference trajectory.

    Args:
        denoise: ``denoise(x, t) -> model output`` for all B latents at timestep t (guided, if the sampler guides).
        reference: ``[T+1, B, ...]`` the reference states ``x_ref[0..T]`` (``x_ref[0]`` is the initial noise; e.g.
            a teacher's latents at its steps and its final sample).
        timesteps: the T model timesteps of nodes 0 … T−1 (descending).
        alpha_bars: ``[T+1]`` ᾱ of nodes 0 … T (the last is the end of sampling, 1.0 for clean data).
        num_steps: the step counts n to answer (each ≤ T).
        solver: "ddim" or "dpmsolver++".
        prediction_type: what the model outputs ("epsilon", "v_prediction", "sample").

    Returns:
        an :class:`OSSResult`.

    Raises:
        ValueError: unknown solver or prediction type, shapes that do not fit, ᾱ outside (0, 1] or not increasing,
            bad step counts, NaN/Inf model outputs.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; OSS baselines exist for {SOLVERS}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; OSS supports {PREDICTION_TYPES} (not flow "
                         "matching)")
    T = len(timesteps)
    if T < 1:
        raise ValueError("the reference needs at least one timestep")
    if reference.dim() < 2 or reference.shape[0] != T + 1:
        raise ValueError(f"reference must be [T+1, B, ...] = [{T + 1}, B, ...] for {T} timesteps, got "
                         f"{list(reference.shape)}")
    ab = torch.as_tensor(alpha_bars, dtype=torch.float64).reshape(-1)
    if ab.numel() != T + 1:
        raise ValueError(f"alpha_bars must hold T+1 = {T + 1} values (the nodes and the end), got {ab.numel()}")
    levels = [node_levels(float(a)) for a in ab]
    if any(b.lam <= a.lam for a, b in zip(levels, levels[1:])):
        raise ValueError("ᾱ must increase strictly along the grid (noise decreasing from node 0 to the end)")
    steps = _check_num_steps(num_steps, T)
    wanted, n_max = set(steps), max(steps)
    ref = reference.to(torch.float32)
    x0 = ref[0]
    count = x0.numel()

    def sq_err(z: torch.Tensor, j: int) -> float:
        return float((z.double() - ref[j].double()).pow(2).sum())

    def useful(k: int, j: int) -> bool:  # can (k, j) still end at node T with a wanted step count?
        return j < T and any(n > k and n - k <= T - j for n in steps)

    layer: dict[int, _State] = {0: _State(x0, 0.0, -1, None)}
    parents: list[dict[int, int]] = [{0: -1}]
    finals: dict[int, tuple[float, int]] = {}
    evaluations = 0
    total = 1 + sum(1 for k in range(1, n_max) for j in range(k, T) if useful(k, j))  # states = evaluations
    bar = tqdm(total=total, desc=f"OSS dynamic programme ({solver})", unit="eval", disable=not progress, leave=False)
    for k in range(n_max):
        nxt: dict[int, _State] = {}
        for i in sorted(layer):
            st = layer[i]
            out = denoise(st.z, timesteps[i])
            evaluations += 1
            bar.update(1)
            out = out.detach().to("cpu", torch.float32)
            if out.shape != x0.shape:
                raise ValueError(f"the model output has shape {list(out.shape)}, expected {list(x0.shape)}")
            if not torch.isfinite(out).all():
                raise ValueError(f"the model output at grid node {i} (step {k}) contains NaN/Inf")
            d0 = data_prediction(st.z, out, levels[i], prediction_type)
            for j in range(i + 1, T + 1):
                last = j == T
                if last and k + 1 not in wanted:
                    continue
                if not last and not useful(k + 1, j):
                    continue
                z = solver_step(solver, st.z, d0, levels[i], levels[j], st.prev).to(torch.float32)
                err = sq_err(z, j)
                if last:
                    if k + 1 not in finals or err < finals[k + 1][0]:
                        finals[k + 1] = (err, i)
                elif j not in nxt or err < nxt[j].err:
                    nxt[j] = _State(z, err, i, (d0, levels[i].lam))
        layer = nxt
        parents.append({j: s.parent for j, s in layer.items()})
    bar.close()
    result = OSSResult(solver=solver, indices={}, timesteps={}, errors={}, grid_timesteps=list(timesteps),
                       evaluations=evaluations, meta={"samples": int(x0.shape[0])})
    for n in steps:
        err, node = finals[n]
        path = trace_back(parents, node, n)
        assert path[0] == 0 and len(path) == n, path
        result.indices[n] = path
        result.timesteps[n] = [timesteps[i] for i in path]
        result.errors[n] = err / count
    logger.info("OSS (%s): %s; %d model evaluations on %d samples", solver,
                {n: result.indices[n] for n in steps}, evaluations, x0.shape[0])
    return result


def trace_back(parents: Sequence[Mapping[K, K]], last: K, n: int) -> list[K]:
    """The n grid nodes of the best path whose last step starts at node ``last``: ``parents[k][j]`` is the node
    before j on the best k-step path to j (the programme's back-pointers; a node is a teacher index, or any key, e.g.
    the (index, rank) states of :func:`olss_fast.core.refine.refit_programme`)."""
    path = [last]
    for k in range(n - 1, 0, -1):
        path.append(parents[k][path[-1]])
    return path[::-1]


def run_path(denoise: Denoise, x0: torch.Tensor, timesteps: Sequence[Any], alpha_bars: Sequence[float],
             path: Sequence[int], solver: str = "ddim", prediction_type: str = "epsilon") -> torch.Tensor:
    """The final latent of ``solver`` stepping along grid nodes ``path`` (then into the last node), from ``x0``.

    The same arithmetic as one path of :func:`oss_search` (used to check it by enumerating paths).
    """
    levels = [node_levels(float(a)) for a in torch.as_tensor(alpha_bars, dtype=torch.float64).reshape(-1)]
    end = len(levels) - 1
    z, prev = x0.to(torch.float32), None
    nodes = list(path) + [end]
    for i, j in zip(nodes, nodes[1:]):
        out = denoise(z, timesteps[i]).detach().to("cpu", torch.float32)
        d0 = data_prediction(z, out, levels[i], prediction_type)
        z, prev = solver_step(solver, z, d0, levels[i], levels[j], prev).to(torch.float32), (d0, levels[i].lam)
    return z
