"""``sequential_refit`` around its fit: what the re-fitted schedule keeps of the one it re-fits, its refusals with
their exact messages, its progress bar, and independence from the dtype the teacher's latents come in.

tests/test_refine.py checks the fit itself against independent least squares; this file is what a mutation of the
driver must not get past (benchmarks/RESULTS.md, "Mutation testing")."""
from __future__ import annotations

import torch

from olss_fast.core.refine import sequential_refit
from olss_fast.core.schedule import OLSSSchedule
from olss_fast.core.step import student_latent
from helpers import raises_exactly


def _schedule() -> OLSSSchedule:
    c = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.8, 0.1, 0.1, 0.0], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    return OLSSSchedule([900, 500, 100], [0, 5, 9], c, errors=[0.3, 0.2, 0.1], teacher_steps=20,
                        prediction_type="v_prediction", path="minimax", teacher="DDIM-20 (test)",
                        fitted_for={"guidance_scale": 7.5}, meta={"origin": "test"})


def _evaluate(x0: torch.Tensor):
    def evaluate(j, coeffs, history):
        return torch.tanh(student_latent(coeffs, j, x0.float(), history)) + 0.1 * j
    return evaluate


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 2, 3, 3, generator=g)
    targets = torch.randn(3, 6, 2, 3, 3, generator=g, dtype=torch.float64)
    return x0, targets


def test_the_refitted_schedule_keeps_everything_but_its_coefficients_and_errors():
    """Path, timesteps, teacher steps, prediction type, path label, teacher, fitted_for and meta carried over;
    ``refined`` set; meta records the sample count and the paper fit's errors."""
    s = _schedule()
    x0, targets = _data()
    r = sequential_refit(s, x0, targets, _evaluate(x0), progress=False)
    assert (r.timesteps, r.indices, r.teacher_steps) == ([900, 500, 100], [0, 5, 9], 20)
    assert (r.prediction_type, r.path, r.teacher, r.refined) == ("v_prediction", "minimax", "DDIM-20 (test)", True)
    assert r.fitted_for == {"guidance_scale": 7.5}
    assert r.meta == {"origin": "test", "refine_samples": 6, "paper_fit_errors": [0.3, 0.2, 0.1]}
    assert len(r.errors) == 3 and not torch.equal(r.coeffs, s.coeffs)


def test_refusals_name_the_shapes_and_the_step():
    s = _schedule()
    x0, targets = _data()
    msg = "targets must be [3, *noise.shape] = [3, [6, 2, 3, 3]], got {}"
    for bad in (targets[:2], targets[:, :5], torch.cat([targets, targets[:1]])):
        with raises_exactly(msg.format(list(bad.shape))):
            sequential_refit(s, x0, bad, _evaluate(x0), progress=False)

    def nan_at_step_1(j, coeffs, history):
        e = _evaluate(x0)(j, coeffs, history)
        return e * float("nan") if j == 1 else e

    with raises_exactly("the model output at student step 1 contains NaN/Inf"):
        sequential_refit(s, x0, targets, nan_at_step_1, progress=False)


def test_progress_bar_by_default_erased_when_done_and_silent_when_off(capsys):
    """The default shows a bar named after the step count and erases it when done (a fit re-fits many candidates;
    kept bars would pile up); ``progress=False`` writes nothing."""
    s = _schedule()
    x0, targets = _data()
    sequential_refit(s, x0, targets, _evaluate(x0))
    err = capsys.readouterr().err
    assert "refining 3-step schedule" in err and "3/3" not in err.rsplit("\r", 1)[-1]
    assert not err.endswith("\n") and err.rsplit("\r", 2)[-2].strip() == ""  # the last frame is blank
    sequential_refit(s, x0, targets, _evaluate(x0), progress=False)
    assert capsys.readouterr().err == ""


def test_targets_are_used_in_float32_whatever_dtype_they_come_in():
    """The student's latents are float32: targets given in float64 fit exactly as their float32 values do."""
    s = _schedule()
    x0, targets = _data(1)
    a = sequential_refit(s, x0, targets, _evaluate(x0), progress=False)
    b = sequential_refit(s, x0, targets.float(), _evaluate(x0), progress=False)
    assert torch.equal(a.coeffs, b.coeffs) and a.errors == b.errors
