"""Per-step timestep shift (not in the paper; the idea of exposure-bias and time-shift work): the model need not be
evaluated at the teacher timestep its step stands at. Fitted with the re-fit objective of :mod:`olss_fast.core.refine`
(docs/design.md, "Per-step timestep shift")."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from olss_fast.core.refine import RefitState, check_equations, check_output


#: where :func:`shift_timesteps` tries to evaluate a step: its timestep moved toward the next step's by these
#: fractions of the gap (negative: toward more noise); measured on held-out noise, benchmarks/RESULTS.md
#: ("Per-step timestep shift")
SHIFT_FRACTIONS = (-0.25, 0.25, 0.5, 0.75)


def shift_evaluations(n: int, fractions: Sequence[float] = SHIFT_FRACTIONS) -> int:
    """Model evaluations of each sample :func:`shift_timesteps` makes for an n-step path, at most: one run of the
    path, then for step j = 1 … n−1 one run of steps j … n−1 per fraction."""
    return n + len(fractions) * n * (n - 1) // 2


def shift_timesteps(
    timesteps: Sequence[int],
    noise: torch.Tensor,
    targets: torch.Tensor,
    denoise: Callable[[torch.Tensor, Any], torch.Tensor],
    *,
    fractions: Sequence[float] = SHIFT_FRACTIONS,
    granularity: str = "global",
    ridge: float = 1e-8,
) -> tuple[list[int], float, int]:
    """Fit where each step of a path evaluates the model, with the re-fit objective.

    ``timesteps``: the path's integer (VP) timesteps t_0 > … > t_{n−1}; ``targets``: ``[n, B, ...]`` teacher latents
    at the path's next indices, as in :func:`~olss_fast.core.refine.sequential_refit`. Step 0 stays. For j = 1 … n−1
    in turn (earlier steps at their chosen timesteps, later ones at theirs) step j is tried at
    ``round(t_j − f·(t_j − t_{j+1}))`` (``t_n = 0``) for each fraction f, kept strictly between its neighbours; the
    timestep whose re-fitted student has the lowest final error on these samples wins (the unshifted one on ties). A
    try re-uses the model outputs of the steps before j. Returns the timesteps, that final MSE and the number of
    ``denoise`` calls (model evaluations of every sample, unless ``denoise`` itself re-uses outputs).
    """
    n = len(timesteps)
    if any(isinstance(t, bool) or not isinstance(t, int) for t in timesteps):
        raise ValueError(f"shift_timesteps needs integer (VP) timesteps, got {list(timesteps)}")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])) or timesteps[-1] < 0:
        raise ValueError(f"timesteps must be non-negative and strictly descending, got {list(timesteps)}")
    if targets.shape[0] != n or targets.shape[1:] != noise.shape:
        raise ValueError(f"targets must be [{n}, *noise.shape] = [{n}, {list(noise.shape)}], got "
                         f"{list(targets.shape)}")
    check_equations(noise, n, granularity)
    evaluations = 0

    def run(times: list[int], base: RefitState | None, start: int) -> RefitState:
        nonlocal evaluations
        if base is None:
            state = RefitState(noise, n, granularity, ridge)
        else:  # steps before `start` as in base: their outputs kept, row start-1 fitted again (same target)
            state = base.fork(start)
            state.fit(start - 1, targets[start - 1])
        for j in range(start, n):
            state.add_output(check_output(denoise(state.latent(j), times[j]), state.x0f, j))
            evaluations += 1
            state.fit(j, targets[j])
        return state

    chosen = [int(t) for t in timesteps]
    current = run(chosen, None, 0)
    for j in range(1, n):
        below = chosen[j + 1] if j + 1 < n else -1
        tried = {chosen[j]}
        for f in fractions:
            t = int(round(timesteps[j] - f * (timesteps[j] - (timesteps[j + 1] if j + 1 < n else 0))))
            if t in tried or not below < t < chosen[j - 1]:
                continue
            tried.add(t)
            trial = chosen[:j] + [t] + chosen[j + 1:]
            state = run(trial, current, j)
            if state.errors[-1] < current.errors[-1]:
                current, chosen = state, trial
    return chosen, float(current.errors[-1]), evaluations
