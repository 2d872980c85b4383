"""The teacher indices the re-fit programme (:func:`olss_fast.core.refine.refit_programme`) places student steps on,
and how many states (model evaluations of each search sample) it has on them."""
from __future__ import annotations

from typing import Callable, Sequence

from olss_fast.core.checks import integer


def programme_grid(T: int, stride: int) -> list[int]:
    """The teacher indices the programme places steps on: every ``stride``-th, and toward the clean end the
    spacing halves down to 1 (``T − 1, T − 2, T − 4, …`` below ``stride``): the last model evaluation, just before
    clean data, is where the final error is most sensitive to the timestep (on held-out digits 10-step paths whose
    last index was 98 of 100 beat those a plain stride-4 grid ended at 96 by a quarter, benchmarks/RESULTS.md,
    "Cheaper default search")."""
    end = {T - 2**m for m in range(max(stride - 1, 0).bit_length()) if 2**m < stride and T - 2**m > 0}
    return sorted(set(range(0, T, stride)) | end)


def node_rule(T: int, steps: Sequence[int], stride: int) -> Callable[[int, int], bool]:
    """Whether teacher index j is a node of the programme's layer k: on the grid, and a path through it can still end
    at T with one of the wanted step counts."""
    n_max = max(steps)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or n_max > len(programme_grid(T, stride)):
        raise ValueError(f"stride must be a positive integer leaving at least {n_max} of the {T} teacher indices "
                         f"(programme_grid), got {stride!r}")
    grid = programme_grid(T, stride)
    after = {j: len(grid) - 1 - p for p, j in enumerate(grid)}  # grid nodes after j

    def useful(k: int, j: int) -> bool:
        return j in after and any(n > k and n - k - 1 <= after[j] for n in steps)

    return useful


def layer_width(k: int, steps: Sequence[int], final_states: int = 1) -> int:
    """How many states the programme keeps per node of layer k: ``final_states`` where its next step can be the last
    one (k + 1 is a wanted step count), else one. The state with the lowest error at a node is not always the one
    with the lowest error at the end: the last step is fitted to the end, and its error is the one that counts."""
    return final_states if k >= 1 and k + 1 in steps else 1


def programme_states(T: int, num_steps: Sequence[int], stride: int = 1, final_states: int = 1) -> int:
    """The number of states of the programme (one model evaluation of every search sample each) for a
    T-step teacher, these step counts, this stride and ``final_states`` (:func:`layer_width`): layer 0 is the initial
    noise; in layer k every node after the first node of layer k − 1 holds as many states as there are before it in
    layer k − 1, at most :func:`layer_width`."""
    integer(final_states, "final_states", lo=1)
    steps = sorted(set(int(n) for n in num_steps))
    useful = node_rule(T, steps, stride)
    layer, count = {0: 1}, 1
    for k in range(1, steps[-1]):
        nodes, width, before, nxt = sorted(layer), layer_width(k, steps, final_states), 0, {}
        for j in range(nodes[0] + 1, T):
            before += layer.get(j - 1, 0)
            if useful(k, j):
                nxt[j] = min(width, before)
        layer = nxt
        count += sum(layer.values())
    return count
