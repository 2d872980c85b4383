"""The quality benchmarks never score a fit on its own training noise (``benchmarks/heldout.py``).

A work item's noise depends only on (base seed, prompt index, seed index), so a training seed equal to the held-out
base seed trains on the held-out noises: the mixture's "training seed 2" did, until its results were found to hold
two of the held-out noises that decide 8–10 NFE."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from olss_fast.fit.work import make_work_items

_spec = importlib.util.spec_from_file_location(
    "olss_benchmarks_heldout", Path(__file__).resolve().parents[1] / "benchmarks" / "heldout.py")
heldout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(heldout)


def test_the_mixture_training_seeds_share_no_noise_with_its_heldout_sets():
    sets = {"benchmark": make_work_items([None] * 500, base_seed=heldout.MIXTURE_HELDOUT_SEED),
            "confirmation": make_work_items([None] * 2000, base_seed=heldout.MIXTURE_CONFIRMATION_SEED)}
    heldout.check_disjoint(sets["benchmark"], sets["confirmation"], "the two held-out sets")
    for seed in heldout.MIXTURE_TRAINING_SEEDS:
        for name, held in sets.items():
            heldout.check_disjoint(make_work_items([None] * 256, base_seed=seed), held, f"seed {seed}, {name}")


def test_a_training_noise_among_the_heldout_ones_is_refused():
    held = make_work_items([None] * 500, base_seed=2)
    with pytest.raises(ValueError, match=r"mixture, training seed 2: 256 training noises are also held-out"):
        heldout.check_disjoint(make_work_items([None] * 256, base_seed=2), held, "mixture, training seed 2")
    one = make_work_items([None] * 4, base_seed=5) + [held[7]]
    with pytest.raises(ValueError, match=r"x: 1 training noises"):
        heldout.check_disjoint(one, held, "x")
    # the same prompts with another base seed: no noise in common
    heldout.check_disjoint(make_work_items([None] * 500, base_seed=3), held, "seed 3")


def test_the_confirmation_ratio_leaves_out_the_noises_either_run_flipped(monkeypatch):
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("olss_benchmarks_fit_cost", bench / "fit_cost.py")
    fit_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_cost)
    after = {"flips": [1], "per_sample": [0.02, 2.0, 0.04, 0.03]}
    before = {"flips": [3], "per_sample": [0.01, 0.02, 0.02, 1.5]}
    ratio, lo, hi, kept = fit_cost._kept_ratio(after, before)
    # noises 0 and 2 are kept: sqrt((0.02² + 0.04²) / (0.01² + 0.02²)) = 2
    assert kept == 2 and abs(ratio - 2.0) < 1e-12 and lo <= ratio <= hi
    step = {str(n): before for n in fit_cost.STEPS}
    lines = fit_cost.confirmation_lines({"parts": {"seed 1": {"confirmation": step}}},
                                        {"parts": {"seed 1": {"confirmation": {str(n): after for n in fit_cost.STEPS}}}},
                                        ["seed 1"])
    assert "| seed 1 | 1 → 1; 2.000" in "\n".join(lines)
    assert fit_cost.confirmation_lines({"parts": {}}, {"parts": {}}, ["seed 1"]) == []
