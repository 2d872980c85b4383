"""Every rule of ``OLSSSchedule.validate`` and of the coefficient array read from JSON, one case each, at its
boundary: the largest accepted value passes, the next refused one fails with its own exact message.

A rule checked only by "some ValueError" is not checked: a rule that moved by one, or refused with another rule's
message, or with no message at all, would pass such a test (benchmarks/RESULTS.md, "Mutation testing")."""
from __future__ import annotations

import torch

from olss_fast.core.schedule import (
    MAX_CHANNELS, MAX_COEFF, MAX_COEFFS, MAX_STEPS, MAX_TEACHER_STEPS, OLSSSchedule, _coeff_tensor,
)
from helpers import raises_exactly


def _ddim_like(n: int, channels: int | None = None) -> torch.Tensor:
    c = torch.zeros(n, n + 1, dtype=torch.float64)
    for j in range(n):
        c[j, 0] = 0.9
        c[j, 1: j + 2] = 0.1
    return c if channels is None else c.expand(channels, n, n + 1).clone()


def _schedule(n: int = 3, **fields) -> OLSSSchedule:
    """A valid n-step schedule whose fields are then replaced as given, *without* the constructor's own coercion
    (so that ``validate`` alone is what is tested)."""
    s = OLSSSchedule(timesteps=[900 - 100 * j for j in range(n)], indices=[2 * j for j in range(n)],
                     coeffs=_ddim_like(n), teacher_steps=2 * n, errors=[0.5] * n)
    for key, value in fields.items():
        setattr(s, key, value)
    return s


def _refused(schedule: OLSSSchedule, message: str) -> None:
    with raises_exactly(message):
        schedule.validate()


def test_step_count_bounds():
    """One step is a schedule (zero is not); MAX_STEPS steps are allowed, one more is not; MAX_COEFFS coefficients
    in all."""
    _schedule(1).validate()
    _refused(_schedule(1, timesteps=[], indices=[], coeffs=torch.zeros(0, 1, dtype=torch.float64)),
             "an OLSS schedule needs at least one step (timesteps is empty)")
    n = MAX_STEPS
    big = dict(timesteps=list(range(2 * n, 0, -2)), indices=list(range(n)), coeffs=_ddim_like(n), teacher_steps=n,
               errors=[])
    _schedule(1, **big).validate()
    n += 1
    _refused(_schedule(1, timesteps=list(range(2 * n, 0, -2)), indices=list(range(n)), coeffs=_ddim_like(n),
                       teacher_steps=n, errors=[]),
             f"a schedule has at most {MAX_STEPS} steps, got {MAX_STEPS + 1}")
    # MAX_STEPS steps in 3 channels: each bound met, but more coefficients than a schedule may hold
    _refused(_schedule(1, **dict(big, coeffs=_ddim_like(MAX_STEPS, 3))),
             f"a schedule holds at most {MAX_COEFFS} coefficients, got {3 * MAX_STEPS * (MAX_STEPS + 1)}")


def test_indices_and_coefficient_shapes():
    """As many indices as timesteps; coefficients [n, n+1] or [C, n, n+1] with 1 <= C <= MAX_CHANNELS."""
    _refused(_schedule(3, indices=[0, 2]), "schedule has 3 timesteps but 2 indices; they must match")
    shape_msg = ("coeffs must have shape [n, n+1] = [3, 4] (global) or [C, 3, 4] (per channel) for 3 timesteps, "
                 "got {}")
    _refused(_schedule(3, coeffs=torch.zeros(3, 5, dtype=torch.float64)), shape_msg.format([3, 5]))
    _refused(_schedule(3, coeffs=torch.zeros(4, 4, dtype=torch.float64)), shape_msg.format([4, 4]))
    _refused(_schedule(3, coeffs=torch.zeros(1, 1, 3, 4, dtype=torch.float64)), shape_msg.format([1, 1, 3, 4]))
    _refused(_schedule(3, coeffs=torch.zeros(4, dtype=torch.float64)), shape_msg.format([4]))
    for channels in (1, MAX_CHANNELS):
        s = _schedule(1, coeffs=_ddim_like(1, channels))
        s.validate()
        assert s.num_channels == channels
    for channels in (0, MAX_CHANNELS + 1):
        _refused(_schedule(1, coeffs=_ddim_like(1, channels)),
                 f"per-channel coeffs need 1 to {MAX_CHANNELS} channels, got {channels}")


def test_coefficient_values():
    """Finite, at most MAX_COEFF in magnitude (MAX_COEFF itself allowed), zero right of column j+1 in row j."""
    c = _ddim_like(3)
    c[2, 3] = -MAX_COEFF
    _schedule(3, coeffs=c).validate()
    c[2, 3] = -2 * MAX_COEFF
    _refused(_schedule(3, coeffs=c), "coeffs reach 2e+08, beyond the ±1e+08 any usable sampler needs (corrupted, or "
                                     "a degenerate fit)")
    for bad in (float("nan"), float("inf")):
        c = _ddim_like(3)
        c[1, 1] = bad
        _refused(_schedule(3, coeffs=c), "coeffs contain NaN or Inf; the schedule is unusable (re-run the search)")
    for j, col in ((0, 2), (1, 3), (0, 3)):  # the first column each row may not use, and beyond
        c = _ddim_like(3)
        c[j, col] = 1e-3
        _refused(_schedule(3, coeffs=c), "coeffs row j may only use x0 and e_0..e_j: entries right of column j+1 "
                                         "must be zero")
    c = _ddim_like(3)
    c[2, 3] = 1.0  # the last column of the last row is the last output's
    _schedule(3, coeffs=c).validate()


def test_timestep_rules():
    """All integers or all floats; strictly descending, checked between every neighbouring pair; on the noise
    schedule the schedule records."""
    _refused(_schedule(2, timesteps=[900, 500.0]),
             "timesteps must be all integers (VP) or all floats (flow matching), got [900, 500.0]")
    _schedule(2, timesteps=[900.5, 500.25]).validate()
    _refused(_schedule(2, timesteps=[500, 500]), "timesteps must be strictly descending, got [500, 500]")
    _refused(_schedule(3, timesteps=[900, 500, 600]), "timesteps must be strictly descending, got [900, 500, 600]")
    vp = {"noise_schedule": {"kind": "vp", "num_train_timesteps": 1000}}
    _schedule(2, timesteps=[999, 0], fitted_for=vp).validate()
    _refused(_schedule(2, timesteps=[1000, 0], fitted_for=vp),
             "the schedule holds the timestep 1000, which is not one of the VP noise schedule's integer timesteps "
             "0 … 999")


def test_path_rules():
    """The path starts at teacher index 0, increases strictly between every neighbouring pair, and ends below
    teacher_steps (itself at most MAX_TEACHER_STEPS)."""
    _refused(_schedule(2, indices=[1, 5]), "the path must start at teacher index 0, got indices[0] = 1")
    _refused(_schedule(2, indices=[0, 0]), "indices must be strictly increasing, got [0, 0]")
    _refused(_schedule(3, indices=[0, 5, 3]), "indices must be strictly increasing, got [0, 5, 3]")
    _schedule(3, indices=[0, 3, 5], teacher_steps=6).validate()
    _refused(_schedule(3, indices=[0, 3, 5], teacher_steps=5),
             f"teacher_steps = 5 must exceed the path's last teacher index 5 (and be at most {MAX_TEACHER_STEPS})")
    _schedule(2, indices=[0, 5], teacher_steps=MAX_TEACHER_STEPS).validate()
    _refused(_schedule(2, indices=[0, 5], teacher_steps=MAX_TEACHER_STEPS + 1),
             f"teacher_steps = {MAX_TEACHER_STEPS + 1} must exceed the path's last teacher index 5 (and be at most "
             f"{MAX_TEACHER_STEPS})")


def test_error_and_prediction_type_rules():
    """One error per step (or none), each finite and non-negative (zero allowed); a known prediction type."""
    _schedule(2, errors=[]).validate()
    _schedule(2, errors=[0.0, 0.0]).validate()
    _refused(_schedule(2, errors=[0.1]), "errors must have one entry per step (2), got 1")
    for bad in (-1e-12, float("nan"), float("inf")):
        _refused(_schedule(2, errors=[0.1, bad]), "errors must be finite and non-negative")
    _refused(_schedule(2, prediction_type="noise"),
             "unknown prediction_type 'noise'; expected one of ('epsilon', 'v_prediction', 'sample', 'flow')")


# ---------------------------------------------------------------------------------------------------- from JSON
def _coeff_refused(value, n: int, message: str) -> None:
    with raises_exactly(message):
        _coeff_tensor(value, n)


def test_json_coefficients_are_nested_lists_of_the_schedules_shape():
    """The array read from a file: a list of rows (global) or of per-channel matrices, each row n+1 numbers; the
    messages name the part that is wrong."""
    assert torch.equal(_coeff_tensor([[1.0, 0.5]], 1), torch.tensor([[1.0, 0.5]], dtype=torch.float64))
    per = _coeff_tensor([[[1.0, 0.5]], [[0.9, 2]]], 1)
    assert per.shape == (2, 1, 2) and per.dtype == torch.float64 and per[1, 0, 1].item() == 2.0
    _coeff_refused("1.0", 1, "coeffs must be a list, got str")
    _coeff_refused([[[1.0, 0.5]], "x"], 1, "coeffs must be a list, got str")  # a channel that is not a matrix
    _coeff_refused([[1.0, 0.5]] * (MAX_CHANNELS + 1), 1, f"coeffs has {MAX_CHANNELS + 1} entries, more than "
                                                         f"{MAX_CHANNELS}")
    _coeff_refused([[1.0, 0.5], [1.0]], 2, "coeffs rows must have n+1 = 3 entries, got 2")
    _coeff_refused([[1.0, 0.5]], 2, "coeffs must have 2 rows per channel for 2 timesteps, got 1")
    _coeff_refused([[1, 2.0, True], [1.0, 0.0, 0.0]], 2, "a coefficient must be a finite number, got True")
    _coeff_refused([[1, 2.0, "0.5"], [1.0, 0.0, 0.0]], 2, "a coefficient must be a finite number, got '0.5'")
    _coeff_refused([[10 ** 400, 0.5]], 1, "a coefficient is a number too large for a float")
    assert _coeff_tensor([[MAX_COEFF, -MAX_COEFF]], 1).abs().max().item() == MAX_COEFF
    _coeff_refused([[1.0, 2 * MAX_COEFF]], 1,
                   f"a coefficient must be a finite number in [-{MAX_COEFF:g}, {MAX_COEFF:g}], got 2e+08")


def test_json_coefficient_count_is_bounded_before_any_row_is_read():
    """C × n × (n+1) coefficients at most MAX_COEFFS, decided from the shape alone: at the boundary both ways (the
    rows are one shared list, so a refused shape costs nothing)."""
    assert 3 * 836 * 837 > MAX_COEFFS >= 3 * 835 * 836
    row = [0.0] * 837
    _coeff_refused([[row] * 836] * 3, 836, f"a schedule holds at most {MAX_COEFFS} coefficients, got 3 × 836 × 837")
    assert 5 * 647 * 648 <= MAX_COEFFS < 5 * 647 * 649
    t = _coeff_tensor([[[0.0] * 648] * 647] * 5, 647)
    assert t.shape == (5, 647, 648)
