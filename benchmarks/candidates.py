"""Every candidate path the default fit judges, run on a large held-out set (section "The mixture's held-out noise and
its training seeds" of ``benchmarks/RESULTS.md``).

``fit_olss_scheduler`` (``path="refit"``) re-fits each candidate (the programme's proposal, the min-max path, the
uniform path) on the fit part and keeps one with ``olss_fast.core.heldout.choose_on_heldout``. This script wraps that
function to keep every re-fitted candidate, then runs each on held-out noise:

- ``gmm``: the Gaussian mixture with each training seed of ``heldout.MIXTURE_TRAINING_SEEDS``, on 2000 held-out
  noises of base seed ``heldout.MIXTURE_CONFIRMATION_SEED`` (not the benchmark's 500): RMSE against the exact ODE,
  "flips" (noises whose per-sample RMSE is above 0.3: the sample ended in another mixture component than the exact
  solution) and the RMSE over the rest;
- ``digits``: the bundled digits model (classes 0–4 × 20 seeds), on held-out classes 5–9 × 60 seeds of base seeds 777
  (the benchmark's) and 778: RMSE against the DPM-Solver++-100 teacher.

For each candidate it keeps the fit's own numbers too (held-out and pooled final MSE, the re-fit's per-step errors on
the fit part), so that other ways of choosing can be scored offline. Writes ``benchmarks/candidates.json``::

    python benchmarks/candidates.py --part gmm digits     # about 5 + 12 min on 2 CPU cores
    python benchmarks/candidates.py --summary-only         # the table of RESULTS.md from candidates.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import olss_fast.fit.orchestration as orchestration
from olss_fast import fit_olss_scheduler
from olss_fast.core.heldout import run_student
from olss_fast.core.metrics import rmse
from olss_fast.fit.config import RecordConfig
from olss_fast.fit.probe import pipeline_denoiser
from olss_fast.fit.work import make_work_items

from heldout import (DIGITS_HELDOUT_SEED, DIGITS_SECOND_SEED, FLIP, MIXTURE_CONFIRMATION_SEED, MIXTURE_TRAINING_SEEDS,
                     check_disjoint, digits_heldout, mixture_heldout)

HERE = Path(__file__).resolve().parent
STEPS = (4, 5, 6, 8, 10)


class Keep:
    """Wraps ``orchestration.choose_on_heldout`` while active: ``runs`` gets (n, {candidate: re-fitted schedule},
    the choice) for every step count the fit judges."""

    def __init__(self) -> None:
        self.runs: list = []
        self.original = orchestration.choose_on_heldout

    def __enter__(self) -> "Keep":
        def wrapped(candidates, baseline, refit, heldout, **kw):
            fitted = {}

            def keep(schedule):
                fitted[(tuple(schedule.indices), tuple(schedule.timesteps))] = out = refit(schedule)
                return out

            choice = self.original(candidates, baseline, keep, heldout, **kw)
            names: dict = {}
            for name, cand in candidates.items():
                names.setdefault((tuple(cand.indices), tuple(cand.timesteps)), name)
            self.runs.append((baseline.num_steps, {names[k]: f for k, f in fitted.items()}, choice))
            return choice

        orchestration.choose_on_heldout = wrapped
        return self

    def __exit__(self, *exc) -> None:
        orchestration.choose_on_heldout = self.original


def judged(runs, sets: dict, score) -> dict:
    """{n: {"chosen", "candidates": {name: the fit's numbers and ``score`` on every held-out set}}}."""
    out = {}
    for n, fitted, choice in runs:
        per = {}
        for name, f in fitted.items():
            row = {"indices": list(f.indices), "heldout_mse": choice.errors.get(name),
                   "pooled_mse": choice.pooled.get(name), "amplification": choice.amplification.get(name),
                   "step_mse": [float(e) for e in f.errors]}
            for key, (x0, ref, den) in sets.items():
                with torch.no_grad():
                    row[key] = score(run_student(f.coeffs, f.timesteps, x0, den), ref)
            per[name] = row
        out[str(n)] = {"chosen": choice.chosen, "candidates": per}
    return out


def part_gmm(args) -> dict:
    pipe, items, x0, exact = mixture_heldout(2000, MIXTURE_CONFIRMATION_SEED)
    sets = {"heldout 2000": (x0, exact, pipeline_denoiser(pipe, items, RecordConfig(batch_size=2000)))}

    def score(samples, ref):
        each = rmse(samples, ref, per_sample=True)
        clean = each[each <= FLIP]
        return {"rmse": rmse(samples, ref), "flips": int((each > FLIP).sum()),
                "clean_rmse": float(clean.pow(2).mean().sqrt()) if clean.numel() else None}

    out = {}
    for seed in args.gmm_seeds:
        check_disjoint(make_work_items([None] * 256, base_seed=seed), items, f"mixture, training seed {seed}")
        with Keep() as keep:
            fit_olss_scheduler(pipe, [None] * 256, num_steps=STEPS, teacher_steps=100, batch_size=256,
                               base_seed=seed, refine_samples=256, progress=False)
        out[f"seed {seed}"] = judged(keep.runs, sets, score)
        print(f"gmm seed {seed} done", file=sys.stderr, flush=True)
    return out


def part_digits(args) -> dict:
    from olss_fast.models.digits import load_digits_pipeline

    pipe = load_digits_pipeline()
    sets = {}
    for base in (DIGITS_HELDOUT_SEED, DIGITS_SECOND_SEED):
        items, _, x0, teacher = digits_heldout(pipe, base_seed=base)
        check_disjoint(make_work_items([0, 1, 2, 3, 4], 20, base_seed=0), items, "digits")
        sets[f"classes 5-9, base seed {base}"] = (x0, teacher, pipeline_denoiser(pipe, items,
                                                                                 RecordConfig(batch_size=300)))
    with Keep() as keep:
        fit_olss_scheduler(pipe, [0, 1, 2, 3, 4], num_steps=STEPS, teacher_steps=100, seeds_per_prompt=20, base_seed=0,
                           batch_size=200, refine_samples=100, progress=False)
    return {"digits": judged(keep.runs, sets, lambda s, ref: {"rmse": rmse(s, ref)})}


#: ways of choosing among the candidates that pass the guard, scored offline: the fit's (lowest pooled final MSE),
#: the largest per-step re-fit error over all steps / over the first half, and "the min-max path where its pooled MSE
#: is below 1e-4, else the fit's choice"
RULES = {
    "pooled (the default)": lambda c: min(c, key=lambda k: c[k]["pooled_mse"]),
    "largest step error": lambda c: min(c, key=lambda k: max(c[k]["step_mse"])),
    "largest step error, first half": lambda c: min(
        c, key=lambda k: max(c[k]["step_mse"][:max(1, len(c[k]["step_mse"]) // 2)])),
    "min-max below 1e-4": lambda c: "minimax" if "minimax" in c and c["minimax"]["pooled_mse"] <= 1e-4
    else min(c, key=lambda k: c[k]["pooled_mse"]),
}


def summary(res: dict) -> list[str]:
    """Per step count: each candidate's flips and median RMSE over the mixture's seeds, and the RMS over seeds of
    the RMSE each rule's pick reaches (and digits' RMSE of each rule's pick)."""
    parts = res.get("parts", {})
    seeds = [k for k in parts if k.startswith("seed ")]
    lines = []
    for n in map(str, STEPS):
        cells = []
        for name in ("proposal", "minimax", "uniform"):
            got = [parts[s][n]["candidates"][name]["heldout 2000"] for s in seeds
                   if name in parts[s][n]["candidates"]]
            if got:
                flips = [g["flips"] for g in got]
                cells.append(f"{name}: flips {min(flips)}-{max(flips)} (mean {sum(flips) / len(flips):.1f}), median "
                             f"RMSE {sorted(g['rmse'] for g in got)[len(got) // 2]:.4f}")
        rules = []
        for rule, pick in RULES.items():
            text = f"{rule}:"
            if seeds:
                vals = []
                for s in seeds:
                    c = {k: v for k, v in parts[s][n]["candidates"].items() if v["pooled_mse"] is not None}
                    vals.append(c[pick(c)]["heldout 2000"]["rmse"])
                text += f" mixture RMS {(sum(v * v for v in vals) / len(vals)) ** 0.5:.4f}"
            if "digits" in parts:
                c = {k: v for k, v in parts["digits"][n]["candidates"].items() if v["pooled_mse"] is not None}
                text += f" digits {c[pick(c)]['classes 5-9, base seed 777']['rmse']:.4f}"
            rules.append(text)
        if seeds:
            best = [min(v["heldout 2000"]["rmse"] for v in parts[s][n]["candidates"].values()) for s in seeds]
            rules.append(f"best candidate per seed: mixture RMS {(sum(v * v for v in best) / len(best)) ** 0.5:.4f}")
        lines.append(f"{n} NFE | " + "; ".join(cells) + " | " + "; ".join(rules))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", default=["gmm", "digits"], choices=["gmm", "digits"])
    parser.add_argument("--gmm-seeds", nargs="+", type=int, default=list(MIXTURE_TRAINING_SEEDS))
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--summary-only", action="store_true", help="print the summary of candidates.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    file = Path(args.out) / "candidates.json"
    res = json.loads(file.read_text()) if file.exists() else {}
    if args.summary_only:
        print("\n".join(summary(res)))
        return 0
    res.update(date=time.strftime("%Y-%m-%d"), machine=f"2-core CPU container, no GPU (torch {torch.__version__}, 1 "
               "thread)")
    for name in args.part:
        res.setdefault("parts", {}).update({"gmm": part_gmm, "digits": part_digits}[name](args))
        file.write_text(json.dumps(res, indent=1))
    print("\n".join(summary(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
